"""The Yeo-Johnson layer (sknvp.power) and the estimator's ``power_transform`` (the tail
layer's own tests are in test_tails.py)."""

import pickle

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_moons
from strategies import seeds

from sknvp import RealNVPDensity
from sknvp._backprop import manual_gradient
from sknvp.flows import build_realnvp
from sknvp.mixture import GaussianMixtureBase
from sknvp.power import (
    LAMBDA_RANGE,
    YeoJohnson,
    fit_yeo_johnson,
    yeo_johnson,
    yeo_johnson_inverse,
)

lambdas = st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(*LAMBDA_RANGE))
values = st.lists(st.floats(-50.0, 50.0), min_size=1, max_size=20)


def _lognormal(n, d, seed):
    return np.exp(np.random.RandomState(seed).randn(n, d))


@given(lmbda=lambdas, z=values)
def test_transform_is_scipys_yeo_johnson(lmbda, z):
    got = yeo_johnson(
        torch.tensor(z, dtype=torch.float64), torch.tensor(lmbda, dtype=torch.float64)
    )[0]
    np.testing.assert_allclose(got.numpy(), scipy.stats.yeojohnson(np.array(z), lmbda),
                               rtol=1e-10, atol=1e-12)


@given(lmbda=lambdas, z=values)
def test_inverse_undoes_the_transform_and_log_derivatives_cancel(lmbda, z):
    z = torch.tensor(z, dtype=torch.float64)
    lam = torch.tensor(lmbda, dtype=torch.float64)
    y, log_d = yeo_johnson(z, lam)
    back, log_d_inv = yeo_johnson_inverse(y, lam)
    np.testing.assert_allclose(back.numpy(), z.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose((log_d + log_d_inv).numpy(), 0.0, atol=1e-9)


@given(lmbda=lambdas, z=values)
def test_log_derivative_is_autograds_and_gradients_are_finite(lmbda, z):
    # Both branches are evaluated everywhere: the unused one must not put NaN in a gradient.
    z = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    y, log_d = yeo_johnson(z, torch.tensor(lmbda, dtype=torch.float64))
    (grad,) = torch.autograd.grad(y.sum(), z)
    assert torch.isfinite(grad).all()
    np.testing.assert_allclose(torch.log(grad).numpy(), log_d.detach().numpy(), atol=1e-9)


def test_exponent_one_is_the_identity():
    z = torch.linspace(-5, 5, 101, dtype=torch.float64)
    y, log_d = yeo_johnson(z, torch.tensor(1.0, dtype=torch.float64))
    np.testing.assert_allclose(y.numpy(), z.numpy(), atol=1e-12)
    assert torch.equal(log_d, torch.zeros_like(z))


def test_layer_rejects_exponents_outside_the_range_that_maps_onto_the_line():
    with pytest.raises(ValueError, match="real line onto itself"):
        YeoJohnson(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="real line onto itself"):
        YeoJohnson(torch.tensor([2.5]))


@settings(deadline=None)
@given(d=st.integers(1, 4), seed=seeds)
def test_layer_log_det_is_autograds_jacobian(d, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = YeoJohnson(2.0 * torch.rand(d, generator=gen, dtype=torch.float64))
    x = 3.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    _, log_det = layer(x[None])
    np.testing.assert_allclose(float(log_det[0]), float(torch.linalg.slogdet(jac)[1]), atol=1e-9)
    back, inv_log_det = layer.inverse(layer(x[None])[0])
    np.testing.assert_allclose(back[0].numpy(), x.numpy(), atol=1e-9)
    np.testing.assert_allclose(float(inv_log_det[0]), -float(log_det[0]), atol=1e-9)


def test_exponents_draw_in_the_skewed_tail_and_leave_gaussian_columns():
    rng = np.random.RandomState(0)
    skew = np.exp(rng.randn(3000))
    cols = [rng.randn(3000), skew, -skew, np.full(3000, 2.0)]
    z = torch.as_tensor(np.column_stack([(c - c.mean()) / (c.std() or 1.0) for c in cols]))
    lmbda = fit_yeo_johnson(z).numpy()
    assert lmbda[0] == 1.0  # no significant skew: the identity
    assert lmbda[1] < 0.1  # a lognormal: towards log(1 + z)
    assert lmbda[2] > 1.9  # its mirror image
    assert lmbda[3] == 1.0  # a constant column


def test_exponents_are_scipys_maximum_likelihood_ones():
    x = np.random.RandomState(1).gamma(3.0, size=2000)
    z = (x - x.mean()) / x.std()
    got = float(fit_yeo_johnson(torch.as_tensor(z[:, None]))[0])
    assert 0.0 < got < 1.0
    np.testing.assert_allclose(got, scipy.stats.yeojohnson_normmax(z), atol=2e-3)


def test_rows_of_weight_zero_do_not_count():
    rng = np.random.RandomState(2)
    z = torch.as_tensor(np.column_stack([np.exp(rng.randn(500)), rng.randn(500)]))
    w = torch.as_tensor((rng.rand(500) < 0.5).astype(float))
    np.testing.assert_array_equal(
        fit_yeo_johnson(z, w).numpy(), fit_yeo_johnson(z[w > 0]).numpy()
    )


_YJ_2D = (torch.tensor([0.5, -0.2]), torch.tensor([1.5, 0.8]), torch.tensor([0.6, 1.4]))
_TAILS_2D = (torch.tensor([0.1, 0.0]), torch.tensor([1.2, 1.0]), torch.tensor([0.7, 0.8]))


@pytest.mark.parametrize(("power", "half_width", "points"), [
    (_YJ_2D, 40, 1601),
    ((*_YJ_2D[:2], torch.tensor([0.6, 1.0]), *_TAILS_2D), 60, 2401),  # with a tail layer
])
def test_flow_with_the_layer_integrates_to_one_in_2d(power, half_width, points):
    torch.manual_seed(0)
    flow = build_realnvp(2, n_couplings=2, hidden_layer_sizes=(8,), power=power).double()
    assert len(flow.transform) == 2 * len(power) // 3 + 2
    for p in flow.parameters():
        p.data.normal_(0, 0.3)
    g = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        logp = flow.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1))
    mass = float(torch.exp(logp).sum()) * float(g[1] - g[0]) ** 2
    assert abs(mass - 1.0) < 5e-3


@pytest.mark.parametrize("tails", [None, (0.0, 0.5, 1.0)])
def test_hand_derived_gradient_takes_the_layer(tails):
    torch.manual_seed(1)
    d = 3
    power = (torch.zeros(d), torch.ones(d), torch.tensor([0.2, 1.0, 1.7]))
    if tails is not None:  # a sinh-arcsinh layer after it
        power = (*power, torch.zeros(d), torch.ones(d), torch.tensor(tails))
    flow = build_realnvp(
        d, n_couplings=2, hidden_layer_sizes=(16,), mask="alternating",
        loc=torch.zeros(d), scale=torch.ones(d), power=power,
    ).double()
    flow.base = GaussianMixtureBase(
        torch.tensor([0.3, 0.7]), torch.randn(2, d), torch.eye(d).expand(2, d, d)
    ).double()
    for p in flow.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = 2.0 * torch.randn(64, d, dtype=torch.float64)
    w = torch.rand(64, dtype=torch.float64)
    manual = manual_gradient(flow)
    assert manual is not None and manual.prefix_varies
    loss = manual.loss_and_grad(x, w)
    got = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    ref = -(flow.log_prob(x) * w).sum() / w.sum()
    ref.backward()
    np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-10)
    for a, p in zip(got, flow.parameters(), strict=True):
        np.testing.assert_allclose(a.numpy(), p.grad.numpy(), atol=1e-9)


# ----------------------------------------------------------------- the estimator


def _fit(X, **kw):
    params = {"random_state": 0, "max_iter": 30, "hidden_layer_sizes": (32, 32),
              "n_couplings": 4}
    return RealNVPDensity(**{**params, **kw}).fit(X)


def test_skewed_data_get_the_transform_and_score_higher():
    X, T = _lognormal(1500, 3, 0), _lognormal(4000, 3, 1)
    auto, plain = _fit(X), _fit(X, power_transform=None)
    assert plain.power_lambdas_ is None
    assert auto.power_lambdas_ is not None and (auto.power_lambdas_ < 0.2).all()
    assert auto.score(T) > plain.score(T) + 0.1
    samples = auto.sample(2000, random_state=0)
    assert np.isfinite(samples).all()
    # Lognormal rows are positive; the transform puts almost all of the samples there too.
    assert (samples > 0).mean() > 0.97


@pytest.mark.parametrize(("data", "attribute", "rtol", "atol", "atol32"), [
    (lambda: _lognormal(600, 2, 3), "power_lambdas_", 1e-8, 1e-10, 1e-3),
    (lambda: np.random.RandomState(3).standard_cauchy((600, 2)),  # and a tail layer
     "tail_weights_", 1e-7, 1e-9, 2e-3),
])
def test_transform_roundtrip_pickle_and_float32_with_the_layer(
    data, attribute, rtol, atol, atol32
):
    X = data()
    est = _fit(X, power_transform="yeo-johnson")
    assert getattr(est, attribute) is not None
    Z = est.transform(X)
    np.testing.assert_allclose(est.inverse_transform(Z), X, rtol=rtol, atol=atol)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.score_samples(X), est.score_samples(X))
    np.testing.assert_array_equal(getattr(again, attribute), getattr(est, attribute))
    f64 = est.score_samples(X)
    est.set_params(inference_dtype="float32")
    np.testing.assert_allclose(est.score_samples(X), f64, atol=atol32)


def test_symmetric_data_fit_as_without_the_option():
    X = make_moons(400, noise=0.05, random_state=0)[0]
    auto, plain = _fit(X), _fit(X, power_transform=None)
    assert auto.power_lambdas_ is None
    np.testing.assert_array_equal(auto.score_samples(X), plain.score_samples(X))


def test_auto_needs_validation_rows_and_yeo_johnson_does_not():
    X = _lognormal(300, 2, 4)
    assert _fit(X, early_stopping=False).power_lambdas_ is None
    assert _fit(X, early_stopping=False, power_transform="yeo-johnson").power_lambdas_ is not None


def test_auto_decides_out_of_fold_on_small_data_else_on_the_validation_rows(capsys):
    X = _lognormal(500, 2, 5)
    assert _fit(X, verbose=1, max_iter=2).power_lambdas_ is not None
    assert "Yeo-Johnson start against the plain one, out of fold" in capsys.readouterr().out
    assert _fit(X, verbose=1, max_iter=2, couplings_cv=None).power_lambdas_ is not None
    out = capsys.readouterr().out
    assert "Yeo-Johnson start against the plain one, on the validation rows" in out


def test_kernel_base_after_the_layer_is_a_density():
    # Skewed rings on 150 rows: the out-of-fold check may give the flow a kernel base in
    # the coordinates after the layer; either way, the density integrates to one.
    from sklearn.datasets import make_circles

    X = np.exp(make_circles(150, factor=0.5, noise=0.05, random_state=0)[0])
    est = RealNVPDensity(random_state=0, power_transform="yeo-johnson").fit(X)
    assert est.power_lambdas_ is not None
    g = np.linspace(0, 8, 801)
    xx, yy = np.meshgrid(g, g)
    p = np.exp(est.score_samples(np.column_stack([xx.ravel(), yy.ravel()])))
    assert abs(p.sum() * (g[1] - g[0]) ** 2 - 1.0) < 0.02


def test_partial_fit_and_warm_start_keep_the_layer():
    X = _lognormal(500, 2, 6)
    est = _fit(X, power_transform="yeo-johnson", warm_start=True)
    lmbda = est.power_lambdas_
    # (to float32 rounding: training casts the flow, its buffers included, to float32)
    est.partial_fit(X[:100])
    np.testing.assert_allclose(est.power_lambdas_, lmbda, rtol=1e-6)
    est.fit(X)  # warm: more epochs of the same flow
    np.testing.assert_allclose(est.power_lambdas_, lmbda, rtol=1e-6)
    assert np.isfinite(est.score_samples(X)).all()


def test_whitening_after_the_layer_whitens_its_output():
    # whiten=True after the layer must use the rows as the layer hands them on: the start's
    # map then gives the training rows identity covariance (it used the raw rows' factor).
    rng = np.random.RandomState(7)
    z = rng.randn(3000, 3) @ np.array([[1.0, 0.8, 0.3], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])
    X = np.exp(z)
    est = RealNVPDensity(power_transform="yeo-johnson", whiten=True, base="normal",
                         random_state=0)
    sizes, mask = est._check_params(3)
    flow = est._build_module(X, np.ones(len(X)), sizes, mask, True, 0)
    assert any(isinstance(m, YeoJohnson) for m in flow.modules())
    with torch.no_grad():
        u = flow.transform(torch.as_tensor(X))[0].numpy()
    np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(3), atol=1e-4)  # reg 1e-6


@settings(deadline=None)
@given(lmbda=st.lists(lambdas, min_size=1, max_size=4), seed=seeds)
def test_layer_without_autograd_is_the_autograd_path(lmbda, seed):
    # Inference takes a path with one branch per element; it must be the same map.
    layer = YeoJohnson(torch.tensor(lmbda, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    x = 4.0 * torch.randn(50, len(lmbda), generator=gen, dtype=torch.float64)
    x[0] = 0.0
    y, log_det = layer(x)
    back, inv_log_det = layer.inverse(y)
    with torch.no_grad():
        y_fast, log_det_fast = layer(x)
        back_fast, inv_fast = layer.inverse(y)
    np.testing.assert_allclose(y_fast.numpy(), y.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_det_fast.numpy(), log_det.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(back_fast.numpy(), back.detach().numpy(), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(inv_fast.numpy(), inv_log_det.detach().numpy(), atol=1e-12)
