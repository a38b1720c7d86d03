"""The Gaussian-mixture base (sknvp.mixture) and its EM start (sknvp.em)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats
from sklearn.mixture import GaussianMixture
from strategies import random_mixture, randomize_, seeds

from sknvp import em
from sknvp.em import fit_gaussian_mixture, mixture_sizes, select_gaussian_mixture
from sknvp.flows import build_realnvp
from sknvp.mixture import GaussianMixtureBase, _ndtri_exp


def _as_sklearn(mix: GaussianMixtureBase) -> GaussianMixture:
    """A scikit-learn GaussianMixture with the same parameters (for reference densities)."""
    prec = mix.precisions_cholesky().detach().numpy()
    gmm = GaussianMixture(mix.n_components, covariance_type="full")
    gmm.weights_ = torch.softmax(mix.logits, 0).detach().numpy()
    gmm.means_ = mix.means.detach().numpy()
    gmm.precisions_cholesky_ = prec
    gmm.covariances_ = np.linalg.inv(prec @ prec.transpose(0, 2, 1))
    return gmm


@given(k=st.integers(1, 5), d=st.integers(1, 5), seed=seeds)
def test_log_prob_is_the_mixture_density(k, d, seed):
    mix = random_mixture(k, d, seed)
    u = torch.randn(40, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ours = mix.log_prob(3 * u).numpy()
    np.testing.assert_allclose(ours, _as_sklearn(mix).score_samples(3 * u.numpy()), atol=1e-9)


@given(k=st.integers(1, 6), d=st.integers(1, 8), seed=seeds)
@settings(max_examples=30)
def test_component_log_probs_without_autograd_match_the_training_graph(k, d, seed):
    # Without autograd the residuals are squared in place and the per-coordinate constants
    # summed once per component: the same numbers as the training graph, in float64 and
    # float32, and the rows passed in are not written to.
    mix = random_mixture(k, d, seed)
    u = 3 * torch.randn(25, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        m, rows = mix.to(dtype), u.to(dtype)
        kept = rows.clone()
        want = m.component_log_probs(rows).detach()
        for context in (torch.no_grad, torch.inference_mode):
            with context():
                got = m.component_log_probs(rows)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            assert torch.equal(rows, kept)


@given(k=st.integers(1, 4), d=st.integers(1, 4), seed=seeds)
def test_rosenblatt_log_det_is_the_jacobian_and_the_map_is_triangular(k, d, seed):
    mix = random_mixture(k, d, seed)
    gen = torch.Generator().manual_seed(seed)
    u = mix.sample(3, gen).detach()
    for row in u:
        jac = torch.autograd.functional.jacobian(lambda v: mix(v[None])[0][0], row)
        _, log_det = mix(row[None])
        assert torch.allclose(torch.slogdet(jac)[1], log_det[0].detach(), atol=1e-7)
        assert torch.allclose(jac, torch.tril(jac), atol=1e-10)  # z_d depends on u_{<=d}


@given(k=st.integers(1, 4), d=st.integers(1, 4), seed=seeds)
@settings(max_examples=30)
def test_inverse_undoes_forward(k, d, seed):
    mix = random_mixture(k, d, seed)
    with torch.no_grad():
        u = mix.sample(50, torch.Generator().manual_seed(seed))
        z, log_det = mix(u)
        back, inv_log_det = mix.inverse(z)
    assert torch.allclose(back, u, atol=1e-8)
    assert torch.allclose(log_det + inv_log_det, torch.zeros_like(log_det), atol=1e-7)
    # log p(u) = log N(z) + log|dz/du|
    normal = -0.5 * (z * z).sum(1) - 0.5 * d * np.log(2 * np.pi)
    assert torch.allclose(normal + log_det, mix.log_prob(u), atol=1e-8)


def test_rosenblatt_maps_the_mixture_to_a_standard_normal():
    mix = random_mixture(3, 3, 0)
    with torch.no_grad():
        z = mix(mix.sample(4000, torch.Generator().manual_seed(1)))[0].numpy()
    for j in range(3):
        assert stats.kstest(z[:, j], "norm").pvalue > 1e-3
    assert np.abs(np.corrcoef(z.T) - np.eye(3)).max() < 0.06
    # ...and the inverse maps normal draws to the mixture (its log-density has the same law)
    with torch.no_grad():
        draws = mix.inverse(torch.randn(3000, 3, dtype=torch.float64))[0]
        direct = mix.sample(3000, torch.Generator().manual_seed(2))
        p_value = stats.ks_2samp(mix.log_prob(draws).numpy(), mix.log_prob(direct).numpy())[1]
    assert p_value > 1e-3


def test_ndtri_exp_matches_scipy_in_both_regimes():
    log_p = np.array([-1e5, -3e3, -745.0, -100.0, -31.0, -30.0, -10.0, -1.0, np.log(0.5)])
    ours = _ndtri_exp(torch.as_tensor(log_p)).numpy()
    np.testing.assert_allclose(ours, special.ndtri_exp(log_p), rtol=1e-10)


def test_far_tails_give_finite_latents():
    mix = random_mixture(2, 2, 3)
    u = torch.tensor([[1e3, -1e3], [-50.0, 80.0], [1e8, 1e8]], dtype=torch.float64)
    with torch.no_grad():
        z, log_det = mix(u)
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()


def test_temperature_narrows_each_component():
    mix = random_mixture(1, 2, 4)
    with torch.no_grad():
        cold = mix.sample(2000, torch.Generator().manual_seed(0), temperature=0.25)
        warm = mix.sample(2000, torch.Generator().manual_seed(0))
    ratio = (cold - mix.means).std(0) / (warm - mix.means).std(0)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.25), rtol=1e-8)


def test_constructor_checks_shapes_and_signs():
    w, m, p = torch.ones(2), torch.zeros(2, 3), torch.eye(3).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureBase(torch.ones(3), m, p)
    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureBase(w, m, torch.eye(2).repeat(2, 1, 1))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureBase(torch.tensor([1.0, 0.0]), m, p)
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureBase(w, m, -p)


def test_placeholder_loads_a_saved_state():
    mix = random_mixture(3, 2, 5)
    other = GaussianMixtureBase.placeholder(3, 2)
    other.load_state_dict(mix.state_dict())
    u = torch.randn(10, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(other.log_prob(u), mix.log_prob(u))


@given(d=st.integers(2, 4), k=st.integers(1, 3), seed=seeds)
@settings(max_examples=20)
def test_flow_with_a_mixture_base_is_a_flow_to_a_standard_normal(d, k, seed):
    torch.manual_seed(seed)
    flow = randomize_(build_realnvp(d, 3, (6,), base=random_mixture(k, d, seed)).double(), seed,
                      scale=0.3)
    x = torch.randn(30, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        z, log_det = flow(x)
        normal = -0.5 * (z * z).sum(1) - 0.5 * d * np.log(2 * np.pi)
        assert torch.allclose(normal + log_det, flow.log_prob(x), atol=1e-8)
        back, inv_log_det = flow.inverse(z)
    assert torch.allclose(back, x, atol=1e-7)
    assert torch.allclose(inv_log_det, -log_det, atol=1e-6)


def test_mixture_flow_density_integrates_to_one_in_2d():
    torch.manual_seed(0)
    flow = randomize_(build_realnvp(2, 4, (8,), base=random_mixture(3, 2, 0)).double(), 0,
                      scale=0.3)
    grid = torch.linspace(-25, 25, 1001, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        p = torch.exp(flow.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1)))
    cell = float(grid[1] - grid[0]) ** 2
    assert abs(float(p.sum()) * cell - 1.0) < 2e-3


def test_old_pickles_of_a_flow_load_with_a_normal_base():
    import pickle

    torch.manual_seed(0)
    flow = build_realnvp(2, 2, (4,))
    vars(flow).pop("base", None)  # what a flow pickled before bases existed holds
    flow._modules.pop("base", None)
    assert not hasattr(flow, "base")
    loaded = pickle.loads(pickle.dumps(flow))
    assert loaded.base is None
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.isfinite(loaded.log_prob(x)).all()


# ---------------------------------------------------------------------------------- EM


def _clusters(n=600, seed=0):
    rng = np.random.RandomState(seed)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    labels = rng.randint(3, size=n)
    return centers[labels] + rng.randn(n, 2) * [0.5, 1.0], centers


@pytest.mark.parametrize("max_cv_rows", [0, 2000], ids=["bic", "cross-validated"])
def test_em_recovers_separated_clusters_and_selection_picks_their_number(max_cv_rows):
    # Cross-validated, each fold's EM starts from the fit to all rows: from fresh k-means++
    # seeds, one fold of three components ended in a poor optimum (0.3 nat per row lower) and
    # four components were kept.
    X, centers = _clusters()
    fit = select_gaussian_mixture(
        torch.as_tensor(X), generator=torch.Generator().manual_seed(0), max_cv_rows=max_cv_rows
    )
    assert fit.n_components == 3 and fit.converged
    found = fit.means.numpy()[np.argsort(fit.means.numpy() @ [1.0, 3.0])]
    np.testing.assert_allclose(found, centers[[0, 1, 2]], atol=0.2)
    ref = GaussianMixture(3, random_state=0).fit(X)
    assert abs(fit.log_likelihood - ref.score(X)) < 1e-3
    assert abs(fit.bic - ref.bic(X)) < 1.0


def test_em_with_one_component_is_the_weighted_gaussian_fit():
    X, _ = _clusters(200)
    w = np.random.RandomState(1).uniform(0.2, 3.0, size=len(X))
    fit = fit_gaussian_mixture(torch.as_tensor(X), 1, weights=torch.as_tensor(w))
    mean = np.average(X, axis=0, weights=w)
    cov = np.cov(X, rowvar=False, aweights=w, bias=True) + 1e-6 * np.eye(2)
    np.testing.assert_allclose(fit.means.numpy()[0], mean, rtol=1e-12)
    prec = fit.precisions_cholesky.numpy()[0]
    np.testing.assert_allclose(np.linalg.inv(prec @ prec.T), cov, rtol=1e-10)
    logp = stats.multivariate_normal(mean, cov).logpdf(X)
    assert fit.log_likelihood == pytest.approx(np.average(logp, weights=w), rel=1e-12)


def test_em_chunks_do_not_change_the_result(monkeypatch):
    X, _ = _clusters(300)
    x = torch.as_tensor(X)
    whole = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(em, "_CHUNK_VALUES", 7)
    chunked = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(chunked.means, whole.means, atol=1e-10)
    assert chunked.log_likelihood == pytest.approx(whole.log_likelihood, abs=1e-10)


def test_em_survives_duplicates_and_more_components_than_clusters():
    X = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]]), 20, axis=0)
    fit = fit_gaussian_mixture(torch.as_tensor(X), 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(fit.means).all() and torch.isfinite(fit.precisions_cholesky).all()
    assert np.isfinite(fit.log_likelihood)
    with pytest.raises(ValueError, match="n_components"):
        fit_gaussian_mixture(torch.as_tensor(X[:3]), 4)


def _five_overlapping_components(n=2000, d=10, seed=0):
    """Rows of five full-covariance components (means N(0, I), eigenvalues in [0.05, 1],
    weights 0.3 to 0.1), as the benchmark's 10-D mixture."""
    rng = np.random.RandomState(seed)
    means = rng.normal(size=(5, d))
    scales = [
        np.linalg.qr(rng.normal(size=(d, d)))[0] * np.sqrt(np.exp(rng.uniform(-3.0, 0.0, d)))
        for _ in range(5)
    ]
    labels = rng.choice(5, size=n, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    return np.stack([means[k] + scales[k] @ rng.normal(size=d) for k in labels])


def test_several_starts_keep_the_likeliest_fit():
    x = torch.as_tensor(_five_overlapping_components(600, 4))
    gen = torch.Generator().manual_seed(3)
    singles = [fit_gaussian_mixture(x, 5, generator=gen) for _ in range(4)]
    best = fit_gaussian_mixture(x, 5, generator=torch.Generator().manual_seed(3), n_init=4)
    lls = [f.log_likelihood for f in singles]
    assert len(set(lls)) > 1  # the starts differ, so the choice is tested
    assert best.log_likelihood == max(lls)
    assert torch.equal(best.means, singles[int(np.argmax(lls))].means)
    with pytest.raises(ValueError, match="n_init"):
        fit_gaussian_mixture(x, 2, n_init=0)
    with pytest.raises(ValueError, match="n_init"):
        fit_gaussian_mixture(x, 5, init=best, n_init=2)


def test_one_start_is_the_fit_it_always_was():
    # n_init=1 (the default) draws the same seeds in the same order as before n_init existed
    x = torch.as_tensor(_five_overlapping_components(300, 3))
    a = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    b = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0), n_init=1)
    assert torch.equal(a.means, b.means) and a.log_likelihood == b.log_likelihood


def test_a_start_with_a_nan_likelihood_is_never_kept(monkeypatch):
    x = torch.as_tensor(_five_overlapping_components(300, 3))
    good = fit_gaussian_mixture(x, 2, generator=torch.Generator().manual_seed(0))
    bad = em.MixtureFit(good.weights, good.means, good.precisions_cholesky, math.nan, math.nan,
                        1, False)
    results = iter([bad, good, bad])
    monkeypatch.setattr(em, "_fit_once", lambda *a: next(results))
    assert fit_gaussian_mixture(x, 2, n_init=3) is good


def test_selection_uses_several_starts_up_to_ten_components_only(monkeypatch):
    calls = []
    original = em.fit_gaussian_mixture

    def recording(x, k, **kwargs):
        calls.append((k, kwargs["n_init"]))
        return original(x, k, **kwargs)

    monkeypatch.setattr(em, "fit_gaussian_mixture", recording)
    x = torch.as_tensor(np.random.RandomState(0).uniform(size=(400, 1)))
    select_gaussian_mixture(x, generator=torch.Generator().manual_seed(0), n_init=3,
                            patience=100, max_components=13, max_cv_rows=0)
    assert calls == [(k, 3) for k in range(1, 11)] + [(13, 1)]


def test_sizes_are_every_count_to_ten_then_grow_by_a_third():
    assert mixture_sizes(64) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 17, 22, 29, 38, 49, 64]
    assert mixture_sizes(3) == [1, 2, 3]


def test_validation_rows_choose_the_smallest_size_within_a_standard_error_of_the_best(
    monkeypatch,
):
    X, _ = _clusters(900)
    x, x_valid = torch.as_tensor(X[:600]), torch.as_tensor(X[600:])
    tried = []
    original = em.fit_gaussian_mixture

    def recording(x, k, **kwargs):
        fit = original(x, k, **kwargs)
        tried.append((k, em.log_likelihoods(fit, x_valid).numpy(), fit.bic))
        return fit

    monkeypatch.setattr(em, "fit_gaussian_mixture", recording)
    chosen = select_gaussian_mixture(
        x, x_valid=x_valid, generator=torch.Generator().manual_seed(0), max_cv_rows=0
    )
    means = [v.mean() for _, v, _ in tried]
    top = int(np.argmax(means))
    # three sizes in a row without a better score end the search, once it has reached
    # twice the best size (here the best is 4: sizes 5, 6 and 7 do not end it, 8 does)
    assert tried[top][0] == 4
    assert [k for k, *_ in tried] == list(range(1, 9))
    # the one-standard-error rule on the per-row differences with the best size
    expected = next(
        k for k, v, _ in tried
        if (v - tried[top][1]).mean() >= -(v - tried[top][1]).std() / np.sqrt(len(v))
    )
    assert chosen.n_components == expected == 3
    tried.clear()
    by_bic = select_gaussian_mixture(x, generator=torch.Generator().manual_seed(0), max_cv_rows=0)
    assert by_bic.n_components == min(tried, key=lambda t: t[2])[0] == 3


@pytest.mark.parametrize("validation", [True, False])
def test_a_plateau_of_scores_does_not_end_the_search_below_twice_the_best_size(
    validation, monkeypatch
):
    # Scores that rise to 4 components, stay flat to 7 and rise again from 8 (EM on two rings:
    # four to seven components can all settle on one blurred annulus). Three sizes without a
    # better score after 4 ended the search at 7 and kept 4 (circles, 2,000 rows, seeds 1
    # and 2: -1.3 nats per held-out row instead of -0.66, and holes at -144 to -399).
    def score(k):
        return -2.7 + 0.02 * min(k, 4) if k < 8 else -2.0 - 0.001 * k

    rows = torch.linspace(-0.1, 0.1, 50, dtype=torch.float64)
    monkeypatch.setattr(
        em, "fit_gaussian_mixture",
        lambda x, k, **kw: em.MixtureFit(
            torch.ones(k) / k, torch.zeros(k, 1), torch.ones(k, 1, 1), score(k), -score(k), 1,
            True,
        ),
    )
    monkeypatch.setattr(em, "log_likelihoods", lambda fit, x: fit.log_likelihood + rows)
    x = torch.zeros(1000, 1, dtype=torch.float64)
    chosen = select_gaussian_mixture(x, x_valid=x[:50] if validation else None, max_cv_rows=0)
    assert chosen.n_components == 8


def test_small_data_choose_the_size_by_cross_validation_not_by_ten_validation_rows():
    # 90 training and 10 validation rows of two moons: within a standard error of ten rows
    # one component is as good as any, so the validation rows alone keep one Gaussian. Every
    # training row scored by a fit without its fold tells the sizes apart.
    from sklearn.datasets import make_moons

    X, _ = make_moons(100, noise=0.1, random_state=1)
    T, _ = make_moons(5000, noise=0.1, random_state=100)
    mu, sd = X.mean(0), X.std(0)
    x, x_valid, test = (torch.as_tensor((A - mu) / sd) for A in (X[:90], X[90:], T))
    chosen = select_gaussian_mixture(
        x, x_valid=x_valid, generator=torch.Generator().manual_seed(0)
    )
    by_valid = select_gaussian_mixture(
        x, x_valid=x_valid, generator=torch.Generator().manual_seed(0), max_cv_rows=0
    )
    assert by_valid.n_components == 1
    assert chosen.n_components > 1
    gain = em.mean_log_likelihood(chosen, test) - em.mean_log_likelihood(by_valid, test)
    assert gain > 0.3


def test_a_cross_validated_size_whose_fit_fails_the_validation_rows_is_not_kept():
    # Cross-validation rates a size by fits without each fold; the fit to all rows can still
    # end in a poor EM optimum. Validation rows (per-row log-likelihoods of three fits):
    fits = ["one", "two", "three"]
    rows = torch.tensor([[-2.0, -2.1, -1.9, -2.0], [-1.0, -1.2, -0.8, -1.0],
                         [-1.2, -1.1, -0.8, -0.95]], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    # the validation rows alone keep "two"; "one" is far below it and is replaced,
    assert em._unless_worse_on_validation("one", fits, list(rows), w) == "two"
    # "three" is within a standard error of it and stays.
    assert em._unless_worse_on_validation("three", fits, list(rows), w) == "three"
    # So does a fit 1.6 standard errors below it: a few validation rows are not evidence
    # enough against the choice every row made (wine lost 0.44 nat a row to such overrides).
    four = rows[1] + torch.tensor([-0.5, 0.0, -0.5, 0.1], dtype=torch.float64)
    rows4 = [*rows, four]
    assert em._unless_worse_on_validation("four", [*fits, "four"], rows4, w) == "four"


def test_few_validation_rows_keep_a_smaller_mixture_than_their_best_score():
    # Three clusters; six components fit these 30 validation rows a little better by chance
    # (-3.048 against -3.065 nats per row): within a standard error, so three are kept.
    X, _ = _clusters(630, seed=1)
    x, x_valid = torch.as_tensor(X[:600]), torch.as_tensor(X[600:])
    gen = torch.Generator().manual_seed(0)
    fits = [fit_gaussian_mixture(x, k, generator=gen) for k in (1, 2, 3, 4, 5, 6)]
    scores = [em.log_likelihoods(f, x_valid) for f in fits]
    chosen = em._one_standard_error_choice(fits, scores, torch.ones(30, dtype=torch.float64))
    best = max(range(6), key=lambda i: float(scores[i].mean()))
    assert fits[best].n_components == 6 and chosen.n_components == 3


@pytest.mark.parametrize("max_cv_rows, most", [(0, 4), (2000, 3)])
def test_no_size_with_fewer_than_features_plus_one_rows_per_component(max_cv_rows, most):
    # 13 features, 60 rows: at most 4 components, whatever the criterion says; more would
    # leave covariances singular and their density a spike on a few rows. Cross-validated,
    # the bound is that of a fold's 48 training rows: 3.
    X = np.random.RandomState(0).standard_normal((60, 13))
    tried = []
    original = em.fit_gaussian_mixture
    em.fit_gaussian_mixture = lambda x, k, **kw: tried.append(k) or original(x, k, **kw)
    try:
        select_gaussian_mixture(torch.as_tensor(X), generator=torch.Generator().manual_seed(0),
                                patience=100, max_cv_rows=max_cv_rows)
    finally:
        em.fit_gaussian_mixture = original
    assert max(tried) == most


def test_inverse_of_a_well_separated_mixture_does_not_cycle():
    # Between the modes of a mixture the CDF is flat and Newton's method can jump from one
    # mode to the other and back for ever (here: rows off by up to 2.4 before the guard);
    # the bracketed solver must converge everywhere.
    rng = np.random.RandomState(0)
    X = np.vstack([rng.randn(800, 2) @ rng.randn(2, 2) * 0.3 + 3 * rng.randn(2)
                   for _ in range(15)])
    gmm = GaussianMixture(15, random_state=0).fit(X)
    mix = GaussianMixtureBase(
        torch.as_tensor(gmm.weights_), torch.as_tensor(gmm.means_),
        torch.as_tensor(gmm.precisions_cholesky_),
    )
    with torch.no_grad():
        u = torch.as_tensor(X)
        back = mix.inverse(mix(u)[0])[0]
        z = torch.as_tensor(np.random.RandomState(1).standard_normal((4000, 2)))
        again = mix(mix.inverse(z)[0])[0]
    assert (back - u).abs().max() < 1e-8
    assert (again - z).abs().max() < 1e-9


def test_regularisation_shrinks_only_below_a_hundredth_of_the_least_variance():
    rng = np.random.RandomState(0)
    a = rng.standard_normal((2000, 2))
    plain = torch.as_tensor(a)
    assert em.data_reg_covar(plain) == 1e-6
    for noise in (1e-2, 1e-4):
        x = torch.as_tensor(np.c_[a, a.sum(1) + noise * rng.standard_normal(2000)])
        least = float(torch.linalg.eigvalsh(torch.cov(x.T, correction=0))[0])
        assert least < 1e-4
        assert em.data_reg_covar(x) == pytest.approx(1e-2 * least, rel=1e-6)
    exact = torch.as_tensor(np.c_[a, a.sum(1)])
    assert em.data_reg_covar(exact) == 1e-12
    # weights count: rows of weight 0 do not widen the data
    wide = torch.cat([exact, torch.as_tensor(rng.standard_normal((50, 3)))])
    w = torch.cat([torch.ones(2000), torch.zeros(50)]).double()
    assert em.data_reg_covar(wide) == 1e-6
    assert em.data_reg_covar(wide, w) == 1e-12
    # too few rows to tell: no more rows than features leave an eigenvalue of 0 by chance
    assert em.data_reg_covar(torch.as_tensor(rng.standard_normal((60, 50)))) == 1e-6
    b = rng.standard_normal((12, 4))
    flat = torch.as_tensor(np.c_[b, b.sum(1)])  # 5 features: 12 rows are enough, 11 not
    assert em.data_reg_covar(flat) == 1e-12
    assert em.data_reg_covar(flat[:11]) == 1e-6


# ------------------------------------------------------------------- covariance shrinkage


def _few_rows_many_features(n, d=20, seed=0):
    rng = np.random.RandomState(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing, rng.standard_normal((4000, d)) @ mixing


def test_shrinking_moves_each_covariance_towards_its_mean_eigenvalue_and_rescores():
    X, _ = _clusters(300)
    x = torch.as_tensor(X)
    fit = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    prec = fit.precisions_cholesky.numpy()
    cov = np.linalg.inv(prec @ prec.transpose(0, 2, 1))
    np.testing.assert_allclose(fit.covariances.numpy(), cov, rtol=1e-9)
    assert em.shrink_covariances(fit, 0.0, x).precisions_cholesky is fit.precisions_cholesky
    for rho in (0.3, 1.0):
        shrunk = em.shrink_covariances(fit, rho, x)
        target = np.trace(cov, axis1=1, axis2=2)[:, None, None] / 2 * np.eye(2)
        expected = (1 - rho) * cov + rho * target
        p = shrunk.precisions_cholesky.numpy()
        np.testing.assert_allclose(np.linalg.inv(p @ p.transpose(0, 2, 1)), expected, rtol=1e-9)
        assert shrunk.shrinkage == rho
        assert shrunk.log_likelihood == pytest.approx(float(em.log_likelihoods(shrunk, x).mean()))
        assert shrunk.log_likelihood < fit.log_likelihood  # EM's covariances fit x best
        assert shrunk.bic == pytest.approx(fit.bic - 2 * len(X) * (shrunk.log_likelihood
                                                                    - fit.log_likelihood))
    with pytest.raises(ValueError, match="rho"):
        em.shrink_covariances(fit, 1.5, x)


@pytest.mark.parametrize("validation", [True, False])
def test_plentiful_rows_keep_the_covariances_em_found(validation):
    # Elongated clusters of 600 rows in 2-D: any shrinkage widens their thin direction.
    X, _ = _clusters(900)
    x, x_valid = torch.as_tensor(X[:600]), torch.as_tensor(X[600:])
    gen = torch.Generator().manual_seed(0)
    fit = fit_gaussian_mixture(x, 3, generator=gen)
    chosen = em.choose_shrinkage(
        fit, x, x_valid=x_valid if validation else None, generator=gen, max_cv_rows=0
    )
    assert chosen.shrinkage == 0.0
    assert torch.equal(chosen.precisions_cholesky, fit.precisions_cholesky)


@pytest.mark.parametrize("validation", [True, False])
def test_few_rows_in_many_dimensions_get_shrunk_covariances(validation):
    # 27 rows in 20-D: EM's covariance is nearly singular and new rows score tens of nats
    # below the shrunk one's (with fewer rows than features, millions of nats below).
    X, X_new = _few_rows_many_features(30)
    x, x_new = torch.as_tensor(X[:27]), torch.as_tensor(X_new)
    x_valid = torch.as_tensor(X[27:]) if validation else None
    gen = torch.Generator().manual_seed(0)
    fit = fit_gaussian_mixture(x, 1, generator=gen)
    chosen = em.choose_shrinkage(fit, x, x_valid=x_valid, generator=gen)
    assert chosen.shrinkage >= 0.1
    gain = float(em.log_likelihoods(chosen, x_new).mean() - em.log_likelihoods(fit, x_new).mean())
    assert gain > 10.0


def test_rows_scored_at_minus_infinity_rank_a_shrinkage_last(monkeypatch):
    # A held-out row at -inf (or NaN) under the unshrunk covariances must rank them last, not
    # make the standard error infinite (which would keep the first, unshrunk candidate).
    X, _ = _clusters(900)
    x, x_valid = torch.as_tensor(X[:600]), torch.as_tensor(X[600:])
    fit = fit_gaussian_mixture(x, 3, generator=torch.Generator().manual_seed(0))
    original = em._row_log_likelihoods

    def spiked(rows, log_w, means, prec):
        out = original(rows, log_w, means, prec)
        if rows.shape[0] == 300 and torch.allclose(prec, fit.precisions_cholesky):
            out[:2] = torch.tensor([-math.inf, math.nan], dtype=out.dtype)
        return out

    monkeypatch.setattr(em, "_row_log_likelihoods", spiked)
    chosen = em.choose_shrinkage(fit, x, x_valid=x_valid, max_cv_rows=0)
    assert chosen.shrinkage == em.SHRINKAGE_GRID[1]


def test_cross_validation_honours_row_weights():
    X, _ = _few_rows_many_features(40)
    w = np.ones(40)
    w[::4] = 0.0  # rows of weight 0 never count, in any fold
    x = torch.as_tensor(X)
    gen = torch.Generator().manual_seed(0)
    fit = fit_gaussian_mixture(x, 1, weights=torch.as_tensor(w), generator=gen)
    chosen = em.choose_shrinkage(fit, x, weights=torch.as_tensor(w), generator=gen)
    assert 0.0 < chosen.shrinkage < 1.0
    kept = em.log_likelihoods(chosen, x)[w > 0].mean()
    assert chosen.log_likelihood == pytest.approx(float(kept))


def test_two_rows_in_more_dimensions_get_an_isotropic_covariance():
    # Regression: with no validation rows, two rows left folds of one row each, whose
    # covariances are reg_covar alone, so every shrinkage scored alike and none was chosen:
    # a row 0.5 off the two scored -1.7e6 nats (RealNVPDensity, early_stopping=False).
    x = torch.as_tensor(np.random.RandomState(0).standard_normal((2, 3)))
    fit = fit_gaussian_mixture(x, 1)
    chosen = em.choose_shrinkage(fit, x)
    assert chosen.shrinkage == 1.0
    assert float(em.log_likelihoods(chosen, x + 0.5).min()) > -20.0
    wide = torch.as_tensor(np.random.RandomState(0).standard_normal((2, 1)))
    assert em.choose_shrinkage(fit_gaussian_mixture(wide, 1), wide).shrinkage == 0.0


def test_draw_gathers_factors_for_many_components_as_the_loop_does(monkeypatch):
    # More rows than one batched product takes (2**20 values) and more than 64 components:
    # draw() gathers each row's factor in chunks instead of passing over all rows once per
    # component; the points are the loop's.
    from sknvp import mixture

    mix = random_mixture(80, 3, 0)
    gen = torch.Generator().manual_seed(1)
    components = torch.randint(80, (120_000,), generator=gen)
    noise = torch.randn(120_000, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        gathered = mix.draw(components, noise)
        monkeypatch.setattr(mixture, "_DRAW_LOOP_COMPONENTS", 10**9)
        looped = mix.draw(components, noise)
    np.testing.assert_allclose(gathered.numpy(), looped.numpy(), atol=1e-12)
    assert mix.draw(components[:0], noise[:0]).shape == (0, 3)
