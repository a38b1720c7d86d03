"""Kernel density estimates (sknvp.kernel) and the kernel base of small-data fits."""

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_circles
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KernelDensity
from strategies import seeds

from sknvp import RealNVPDensity
from sknvp.kernel import BANDWIDTH_GRID, KernelBase, fit_kernel, kernel_log_densities
from sknvp.mixture import GaussianMixtureBase


def _rows(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_one_feature_is_scikit_learns_kernel_density():
    x, q = _rows(40, 1, 0), _rows(9, 1, 1)
    fit = fit_kernel(x)
    ref = KernelDensity(bandwidth=fit.bandwidth * float(x.std(unbiased=False)))
    expected = ref.fit(x.numpy()).score_samples(q.numpy())
    np.testing.assert_allclose(kernel_log_densities(fit, q).numpy(), expected, atol=1e-8)


def test_bandwidth_maximises_the_leave_one_out_likelihood():
    # Brute force: for each bandwidth, each row scored by scikit-learn's estimate on the
    # other rows (one feature, so h * sd is scikit-learn's bandwidth).
    x = torch.cat([_rows(15, 1, 2) - 3.0, 0.3 * _rows(15, 1, 3) + 2.0])
    sd = float(x.std(unbiased=False))
    grid = BANDWIDTH_GRID[::6]

    def loo(h):
        rows = x.numpy()
        return np.mean([
            KernelDensity(bandwidth=h * sd).fit(np.delete(rows, i, 0)).score_samples(rows[i:i + 1])
            for i in range(len(rows))
        ])

    scores = [loo(h) for h in grid]
    assert fit_kernel(x, grid=grid).bandwidth == grid[int(np.argmax(scores))]


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 4), seed=seeds)
def test_estimate_moves_with_an_affine_map_of_the_rows(d, seed):
    x, q = _rows(30, d, seed), _rows(7, d, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    # A map of singular values 0.5 to 2 (the covariance's tiny ridge is then negligible).
    q_, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    a = q_ * (0.5 + 1.5 * torch.rand(d, generator=gen, dtype=torch.float64))
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    # The full-covariance shape only: the others keep the features' own axes or units.
    fit, mapped = fit_kernel(x, shapes=("full",)), fit_kernel(x @ a.T + b, shapes=("full",))
    assert mapped.bandwidth == fit.bandwidth
    log_det = float(torch.linalg.slogdet(a)[1])
    np.testing.assert_allclose(
        kernel_log_densities(mapped, q @ a.T + b).numpy(),
        kernel_log_densities(fit, q).numpy() - log_det, atol=1e-7,
    )


def test_spherical_shape_is_scikit_learns_kernel_density_in_the_rows_units():
    x = _rows(60, 2, 9) * torch.tensor([3.0, 0.5], dtype=torch.float64)
    q = _rows(9, 2, 10)
    fit = fit_kernel(x, shapes=("spherical",))
    assert fit.shape == "spherical"
    spread = math.sqrt(float(x.var(0, unbiased=False).mean()))
    ref = KernelDensity(bandwidth=fit.bandwidth * spread).fit(x.numpy())
    np.testing.assert_allclose(kernel_log_densities(fit, q).numpy(),
                               ref.score_samples(q.numpy()), atol=1e-7)


def _loo_by_refitting(x, shape, bandwidth):
    """Each row scored by the kernel estimate refitted to the other rows."""
    n = x.shape[0]
    return float(torch.cat([
        kernel_log_densities(
            fit_kernel(x[torch.arange(n) != i], shapes=(shape,), grid=(bandwidth,)), x[i:i + 1]
        ) for i in range(n)
    ]).mean())


@pytest.mark.parametrize("data, winner", [("line", "full"), ("moons", "spherical")])
def test_shape_is_the_one_with_the_best_leave_one_out_likelihood(data, winner):
    # Rows along a diagonal line: a kernel stretched along it (the full covariance's shape)
    # scores left-out rows 0.17 nat higher than round ones. Two moons in their own units:
    # the noise is round there, and the spherical kernel leads the others by 0.03.
    if data == "line":
        rng = np.random.RandomState(0)
        t = rng.uniform(-3, 3, 200)
        X = np.c_[t + 0.05 * rng.randn(200), t + 0.05 * rng.randn(200)]
    else:
        from sklearn.datasets import make_moons

        X = make_moons(200, noise=0.05, random_state=0)[0]
    x = torch.as_tensor(X)
    scores = {
        shape: _loo_by_refitting(x, shape, fit_kernel(x, shapes=(shape,)).bandwidth)
        for shape in ("full", "diagonal", "spherical")
    }
    assert max(scores, key=scores.get) == winner
    assert fit_kernel(x).shape == winner


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 3), seed=seeds)
def test_axes_carry_the_shapes_of_the_original_features(d, seed):
    # Rows mapped by u = A x + b and fitted with axes A (up to a factor): the estimate is
    # the one of the original rows, mapped, whichever shape wins. Up to the covariance's
    # ridge (1e-9 of its mean eigenvalue), which an ill-conditioned A makes felt: with
    # singular values 4.1 and 0.08 (seed 3611623) it moved log-densities by 1e-4.
    gen = torch.Generator().manual_seed(seed)
    x = _rows(40, d, seed) * (0.2 + 3 * torch.rand(d, generator=gen, dtype=torch.float64))
    q = _rows(6, d, seed + 1)
    a = 0.5 * torch.randn(d, d, generator=gen, dtype=torch.float64) + 3 * torch.eye(
        d, dtype=torch.float64
    )
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    fit = fit_kernel(x)
    mapped = fit_kernel(x @ a.T + b, axes=a / 7.0)
    assert (mapped.shape, mapped.bandwidth) == (fit.shape, fit.bandwidth)
    np.testing.assert_allclose(
        kernel_log_densities(mapped, q @ a.T + b).numpy(),
        kernel_log_densities(fit, q).numpy() - float(torch.linalg.slogdet(a)[1]),
        rtol=1e-5, atol=1e-5,
    )


def test_singular_axes_leave_the_full_shape():
    x = _rows(30, 2, 11)
    axes = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert fit_kernel(x, axes=axes).shape == "full"


def test_density_integrates_to_one_in_two_dimensions():
    fit = fit_kernel(_rows(25, 2, 4) * torch.tensor([1.0, 0.5], dtype=torch.float64))
    g = torch.linspace(-6, 6, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    cell = float(g[1] - g[0]) ** 2
    assert float(torch.exp(kernel_log_densities(fit, grid)).sum()) * cell == pytest.approx(
        1.0, abs=1e-3
    )


def test_rows_of_weight_zero_are_left_out():
    x = _rows(20, 2, 5)
    w = torch.ones(20, dtype=torch.float64)
    w[:5] = 0.0
    with_zeros, without = fit_kernel(x, w), fit_kernel(x[5:])
    assert with_zeros.centers.shape[0] == 15
    assert with_zeros.bandwidth == without.bandwidth
    q = _rows(5, 2, 6)
    np.testing.assert_allclose(
        kernel_log_densities(with_zeros, q).numpy(), kernel_log_densities(without, q).numpy()
    )


def test_a_constant_feature_leaves_the_covariance_invertible():
    x = _rows(20, 2, 7)
    x[:, 1] = 3.0
    assert torch.isfinite(kernel_log_densities(fit_kernel(x), x)).all()


def test_one_row_and_unknown_shapes_are_refused():
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_kernel(_rows(1, 2, 8))
    with pytest.raises(ValueError, match="shape must be one of"):
        fit_kernel(_rows(5, 2, 8), shapes=("round",))


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 30), d=st.integers(1, 5), seed=seeds)
def test_kernel_base_is_the_mixture_with_one_shared_factor(k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    prec = torch.randn(d, d, generator=gen, dtype=torch.float64).triu()
    prec.diagonal().abs_().add_(0.5)
    centers = torch.randn(k, d, generator=gen, dtype=torch.float64)
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    tied = KernelBase(weights, centers, prec)
    full = GaussianMixtureBase(weights, centers, prec.expand(k, d, d))
    u = centers[torch.randint(k, (40,), generator=gen)] + 0.5 * torch.randn(
        40, d, generator=gen, dtype=torch.float64
    )
    with torch.no_grad():
        np.testing.assert_allclose(tied.log_prob(u).numpy(), full.log_prob(u).numpy(),
                                   atol=1e-9)
        z, log_det = tied(u)
        z_full, log_det_full = full(u)
        np.testing.assert_allclose(z.numpy(), z_full.numpy(), atol=1e-9)
        np.testing.assert_allclose(log_det.numpy(), log_det_full.numpy(), atol=1e-9)
        # The inverse is the mixture's own (its accuracy is tested with the mixture).
        np.testing.assert_allclose(tied.inverse(z)[0].numpy(), full.inverse(z)[0].numpy(),
                                   atol=1e-9)
    # With autograd, the same values and the gradient of a sum of log-densities.
    tied.log_prob(u).sum().backward()
    full.log_prob(u).sum().backward()
    np.testing.assert_allclose(tied.means.grad.numpy(), full.means.grad.numpy(), atol=1e-8)
    np.testing.assert_allclose(tied.logits.grad.numpy(), full.logits.grad.numpy(), atol=1e-8)
    assert tied.log_diag.shape == (1, d)  # one factor, not k


def test_kernel_base_draws_around_its_rows():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    base = KernelBase(torch.tensor([0.25, 0.75], dtype=torch.float64), centers,
                      torch.eye(2, dtype=torch.float64) * 4.0)  # sd 0.25
    with torch.no_grad():
        draws = base.sample(20000, torch.Generator().manual_seed(0))
    right = draws[:, 0] > 5
    assert float(right.double().mean()) == pytest.approx(0.75, abs=0.02)
    assert float(draws[right, 0].std()) == pytest.approx(0.25, rel=0.05)


# --- RealNVPDensity --------------------------------------------------------------------

# Small flows: the choice of the kernel base is made after training, whatever the flow.
SMALL = {"n_couplings": 2, "hidden_layer_sizes": (16, 16), "max_iter": 30, "device": "cpu"}


def _rings(n, seed):
    return make_circles(n, noise=0.05, factor=0.5, random_state=seed)[0]


@pytest.fixture(scope="module")
def rings_fit():
    # 150 rows of two rings: a Gaussian mixture of a few components cannot follow them, and
    # the out-of-fold rows favour the kernel estimate (1.2 to 3 standard errors on seeds 0-2).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return RealNVPDensity(random_state=0, **SMALL).fit(_rings(150, 0))


def test_kernel_base_is_chosen_where_it_scores_new_rows_higher(rings_fit, monkeypatch):
    X_new = _rings(4000, 1)
    assert rings_fit.kernel_bandwidth_ is not None
    assert rings_fit.kernel_shape_ in ("full", "diagonal", "spherical")
    assert isinstance(rings_fit.module_.base, KernelBase)
    assert rings_fit.n_components_ == 150  # one component per training row
    monkeypatch.setattr(RealNVPDensity, "_use_kernel_base_if_it_gains", lambda *a: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        flow = RealNVPDensity(random_state=0, **SMALL).fit(_rings(150, 0))
    assert flow.kernel_bandwidth_ is None
    assert rings_fit.score(X_new) > flow.score(X_new) + 0.1


def test_kernel_base_is_the_kernel_estimate_of_the_training_rows(rings_fit):
    X = _rings(150, 0)
    fit = fit_kernel(torch.as_tensor(X))
    assert fit.bandwidth == pytest.approx(rings_fit.kernel_bandwidth_)
    q = _rings(50, 2)
    np.testing.assert_allclose(
        rings_fit.score_samples(q), kernel_log_densities(fit, torch.as_tensor(q)).numpy(),
        atol=1e-8,
    )


def test_kernel_base_samples_transforms_and_pickles(rings_fit):
    S = rings_fit.sample(3000, random_state=0)
    assert np.isfinite(S).all()
    # Samples of the estimate: every one within a few bandwidths of a training ring.
    radius = np.hypot(S[:, 0], S[:, 1])
    assert np.mean((np.abs(radius - 1) < 0.4) | (np.abs(radius - 0.5) < 0.3)) > 0.95
    q = _rings(20, 3)
    np.testing.assert_allclose(rings_fit.inverse_transform(rings_fit.transform(q)), q,
                               atol=1e-8)
    again = pickle.loads(pickle.dumps(rings_fit))
    assert again.kernel_bandwidth_ == rings_fit.kernel_bandwidth_
    np.testing.assert_array_equal(again.score_samples(q), rings_fit.score_samples(q))


def test_warm_start_on_a_kernel_base_fits_afresh(rings_fit):
    from sklearn.base import clone

    est = clone(rings_fit).set_params(warm_start=True)
    X = _rings(150, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X)
    assert any("kernel estimate" in str(w.message) for w in caught)
    # Afresh: the same fit as the first, not one continued from it.
    np.testing.assert_allclose(est.score_samples(X[:20]), rings_fit.score_samples(X[:20]))


@pytest.mark.parametrize("params", [
    {"couplings_cv": None},  # no out-of-fold rows
    {"n_components": 3},  # the mixture's size is the user's
    {"base": "normal"},
])
def test_kernel_base_needs_the_out_of_fold_check_and_an_auto_mixture(params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(random_state=0, **{**SMALL, **params}).fit(_rings(150, 0))
    assert est.kernel_bandwidth_ is None


def test_kernel_base_is_not_chosen_for_gaussian_rows():
    X = np.random.RandomState(0).normal(size=(200, 3)) @ np.array(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.2]]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(random_state=0, **SMALL).fit(X)
    assert est.kernel_bandwidth_ is None
    assert est.n_components_ < 10


def test_rows_of_weight_zero_are_not_kernel_centres():
    X = _rings(170, 0)
    w = np.ones(170)
    w[150:] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(random_state=0, **SMALL).fit(X, sample_weight=w)
    assert est.kernel_bandwidth_ is not None
    assert est.n_components_ == 150
    assert math.isfinite(est.score(X))


def test_kernel_base_is_weighed_also_where_no_epoch_beat_the_start():
    # Couplings that cannot move: every fit keeps its Gaussian-mixture start, and the folds
    # build only their starts, which the kernel estimate must beat.
    params = {**SMALL, "learning_rate_init": 1e-12, "max_iter": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = RealNVPDensity(random_state=0, **params).fit(_rings(150, 0))
    assert est.n_iter_ >= 1
    assert est.kernel_bandwidth_ is not None and est.n_components_ == 150


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_base_on_cuda_is_the_cpu_estimate():
    # The kernel's folds, Jacobian and base live on the fitted device; the estimate is the
    # rows' kernel estimate there too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(random_state=0, **{**SMALL, "device": "cuda"}).fit(_rings(150, 0))
    assert est.device_.type == "cuda"
    assert est.kernel_bandwidth_ is not None and est.n_components_ == 150
    fit = fit_kernel(torch.as_tensor(_rings(150, 0)))
    q = _rings(50, 2)
    assert (est.kernel_shape_, est.kernel_bandwidth_) == (fit.shape, fit.bandwidth)
    np.testing.assert_allclose(est.score_samples(q),
                               kernel_log_densities(fit, torch.as_tensor(q)).numpy(), atol=1e-8)
    assert np.isfinite(est.sample(100, random_state=0)).all()
