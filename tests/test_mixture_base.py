"""RealNVPDensity's default Gaussian-mixture base: how it starts, what it buys, its latent."""

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.exceptions import ConvergenceWarning

import sknvp._density as density_module
from sknvp import RealNVPDensity, datasets

FAST = {"n_couplings": 4, "hidden_layer_sizes": (16, 16), "max_iter": 15, "batch_size": 64,
        "learning_rate_init": 5e-3, "random_state": 0, "device": "cpu"}
EIGHT = {"radius": 2.0, "noise": 0.2}


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


@pytest.fixture(scope="module")
def eight():
    X = datasets.make_eight_gaussians(2000, random_state=0, **EIGHT)
    X_test = datasets.make_eight_gaussians(4000, random_state=1, **EIGHT)
    return X, X_test


@pytest.fixture(scope="module")
def fitted_eight(eight):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return RealNVPDensity(**FAST).fit(eight[0])


def test_the_default_base_is_a_mixture_and_normal_is_the_papers(moons):
    est = RealNVPDensity(**FAST).fit(moons[0])
    assert est.base == "mixture" and est.n_components_ >= 2
    assert est.module_.base.n_components == est.n_components_
    normal = RealNVPDensity(**FAST, base="normal").fit(moons[0])
    assert normal.n_components_ is None and normal.module_.base is None
    three = RealNVPDensity(**FAST, n_components=3).fit(moons[0])
    assert three.n_components_ == 3
    with pytest.raises(AttributeError, match="set by fit"):
        _ = RealNVPDensity().n_components_


def test_a_mixture_base_fits_separated_modes_a_normal_base_cannot(eight, fitted_eight):
    # Eight well-separated Gaussians: a short fit on the mixture base is within a tenth of a
    # nat of the true density; the same flow on a standard normal must squeeze the gaps.
    X, X_test = eight
    truth = datasets.true_log_density("eight_gaussians", X_test, **EIGHT).mean()
    normal = RealNVPDensity(**FAST, base="normal").fit(X)
    assert fitted_eight.n_components_ >= 8
    assert fitted_eight.score(X_test) > truth - 0.1
    assert fitted_eight.score(X_test) > normal.score(X_test) + 0.5


def test_latent_codes_of_samples_are_standard_normal(fitted_eight):
    Z = fitted_eight.transform(fitted_eight.sample(4000, random_state=0))
    for j in range(2):
        assert stats.kstest(Z[:, j], "norm").pvalue > 1e-3
    assert abs(np.corrcoef(Z.T)[0, 1]) < 0.06


def test_sampling_and_inverting_normal_draws_give_the_same_law(fitted_eight):
    # Two routes to the fitted density: sample() draws from the mixture and runs the couplings
    # backwards; inverse_transform() runs the mixture's inverse Rosenblatt map as well.
    direct = fitted_eight.sample(3000, random_state=0)
    inverted = fitted_eight.inverse_transform(np.random.RandomState(1).standard_normal((3000, 2)))
    for j in range(2):
        assert stats.ks_2samp(direct[:, j], inverted[:, j]).pvalue > 1e-3
    np.testing.assert_allclose(fitted_eight.inverse_transform(fitted_eight.transform(direct)),
                               direct, atol=1e-8)


def test_density_with_a_mixture_base_integrates_to_one(fitted_eight, eight):
    lo, hi = eight[0].min(0) - 3, eight[0].max(0) + 3
    g = [np.linspace(a, b, 400) for a, b in zip(lo, hi, strict=True)]
    xx, yy = np.meshgrid(*g)
    p = np.exp(fitted_eight.score_samples(np.c_[xx.ravel(), yy.ravel()]))
    assert p.sum() * (g[0][1] - g[0][0]) * (g[1][1] - g[1][0]) == pytest.approx(1.0, abs=0.01)


def test_more_components_than_rows_is_a_clear_error_that_leaves_the_model(moons):
    est = RealNVPDensity(**FAST).fit(moons[0])
    before = est.score_samples(moons[1])
    with pytest.raises(ValueError, match="n_components=500 needs at least"):
        est.set_params(n_components=500).fit(moons[0][:100])
    np.testing.assert_array_equal(est.score_samples(moons[1]), before)


def test_em_honours_sample_weight(rng):
    # Rows of weight zero (a far cluster) play no part in the mixture's start either.
    near = rng.normal(size=(300, 2))
    far = rng.normal(size=(300, 2)) + 40.0
    X = np.r_[near, far]
    w = np.r_[np.ones(300), np.zeros(300)]
    est = RealNVPDensity(**{**FAST, "max_iter": 2}, early_stopping=False).fit(X, sample_weight=w)
    assert est.n_components_ == 1
    assert est.score(near) > est.score(far) + 100


def test_the_size_is_chosen_on_the_validation_rows_or_by_bic_without_them(moons, monkeypatch):
    seen = []
    original = density_module.select_gaussian_mixture

    def recording(U, **kwargs):
        valid = kwargs["x_valid"]
        seen.append((U.shape[0], None if valid is None else valid.shape[0]))
        return original(U, **kwargs)

    monkeypatch.setattr(density_module, "select_gaussian_mixture", recording)
    RealNVPDensity(**{**FAST, "max_iter": 1}).fit(moons[0])
    RealNVPDensity(**{**FAST, "max_iter": 1}, early_stopping=False).fit(moons[0])
    assert seen == [(360, 40), (400, None)]


def test_em_sees_a_seeded_subsample_of_large_data(moons, monkeypatch):
    seen = []
    original = density_module.select_gaussian_mixture

    def recording(U, **kwargs):
        seen.append(U.shape[0])
        return original(U, **kwargs)

    monkeypatch.setattr(density_module, "select_gaussian_mixture", recording)
    monkeypatch.setattr(density_module, "_EM_MAX_ROWS", 100)
    monkeypatch.setattr(density_module, "_EM_MIN_ROWS", 50)
    a = RealNVPDensity(**{**FAST, "max_iter": 1}).fit(moons[0])
    b = RealNVPDensity(**{**FAST, "max_iter": 1}).fit(moons[0])
    assert seen == [100, 100]
    np.testing.assert_array_equal(a.score_samples(moons[1]), b.score_samples(moons[1]))


def test_two_rings_from_few_rows_get_enough_components():
    # Regression: EM with four to seven components settled on one blurred annulus around
    # both rings, the search stopped after three sizes without progress and kept four
    # components; the couplings then tore holes (held-out rows at -144 to -399 nats).
    kw = {"factor": 0.5, "noise": 0.05}
    X = datasets.make_circles(2000, random_state=0, **kw)
    X_test = datasets.make_circles(10_000, random_state=1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(random_state=1, max_iter=1).fit(X)
    assert est.n_components_ >= 8
    assert est.score(X_test) > -0.8  # four components: -1.36 (the truth: about -0.62)


def test_a_feature_that_is_nearly_the_sum_of_others_keeps_its_thin_density():
    # Regression: EM's fixed reg_covar of 1e-6 (standardised units) floored the variance of
    # the direction the data barely occupy (x3 = x1 + x2 + 1e-6 noise): 2.48 nats per
    # held-out row instead of the 9.5 the thin density is worth.
    rng = np.random.RandomState(0)
    a = rng.standard_normal((6000, 2))
    X = np.c_[a, a.sum(1) + 1e-6 * rng.standard_normal(6000)]
    est = RealNVPDensity(random_state=0, max_iter=1).fit(X[:3000])
    assert est.score(X[3000:]) > 8.5
    assert np.all(np.isfinite(est.sample(500, random_state=0)))


def test_weight_decay_leaves_the_mixture_base_alone(eight):
    # alpha is an L2 penalty on the couplings; on the base it shrank the mixture's means
    # towards the origin (mean norm 1.4007 -> 1.3845 in 5 epochs at alpha=0.1).
    from sknvp._training import make_adam

    def fitted(alpha):
        return RealNVPDensity(
            random_state=0, max_iter=5, alpha=alpha, early_stopping=False
        ).fit(eight[0])

    plain, decayed = fitted(0.0), fitted(0.1)
    norms = [m.module_.base.means.norm(dim=1).mean().item() for m in (plain, decayed)]
    assert abs(norms[1] - norms[0]) < 2e-3
    groups = make_adam(decayed.module_, 1e-3, 0.1).param_groups
    base = {id(p) for p in decayed.module_.base.parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == base
    assert not base & {id(p) for p in groups[0]["params"]}
    # a warm start keeps both groups' decays
    decayed.set_params(warm_start=True, max_iter=1).fit(eight[0])
    resumed = decayed._resume_optimizer(decayed.module_, decayed._weight_decay(len(eight[0])))
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.1, 0.0]


def test_an_explicit_size_beyond_the_rows_per_component_warns(rng):
    # 64 components on 1,437 rows of 64-D digits scored held-out rows at -2.6e6 nats with
    # no word of warning; "auto" never goes past one component per n_features + 1 rows.
    X = rng.standard_normal((200, 9))  # 180 training rows: 18 components at most
    with pytest.warns(UserWarning, match="fewer than n_features \\+ 1 = 10 training rows"):
        RealNVPDensity(n_components=19, max_iter=1, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        RealNVPDensity(n_components=18, max_iter=1, random_state=0).fit(X)


def test_the_default_weight_decay_keeps_heavy_tails_beyond_the_data():
    # Student's t with 2 degrees of freedom: the couplings, free to bend where no training
    # row is, spent 13-30 nats on test rows beyond the training rows' range (held-out mean
    # -4.17 against the truth's -3.94). Weight decay on the couplings (alpha=1e-3, the
    # default since 2026-12-06) keeps them near the identity there.
    rng = np.random.RandomState(2)
    X, X_test = rng.standard_t(2, size=(3000, 2)), rng.standard_t(2, size=(20000, 2))
    truth = stats.t(2).logpdf(X_test).sum(1).mean()
    model = RealNVPDensity(random_state=1, device="cpu").fit(X)
    assert model.score(X_test) > truth - 0.1  # alpha=0: -4.17, 0.23 below the truth


@pytest.mark.parametrize(
    "alpha, n, expected", [("auto", 40, 1 / 36), ("auto", 3000, 1e-3), (1e-4, 40, 1e-4)]
)
def test_auto_weight_decay_is_a_unit_prior_on_few_rows(monkeypatch, alpha, n, expected):
    # "auto": 1 / n_train below 1,000 training rows (a standard normal prior on the weights
    # against the summed log-likelihood), 1e-3 from there; a number is used as given.
    seen = []
    real = density_module.fit_flow

    def spy(*args, **kwargs):
        seen.append(kwargs["alpha"])
        return real(*args, **kwargs)

    monkeypatch.setattr(density_module, "fit_flow", spy)
    X = datasets.make_moons(n, noise=0.1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        RealNVPDensity(alpha=alpha, max_iter=1, random_state=0).fit(X)
    assert seen[0] == pytest.approx(expected)  # the fit's; then its folds' (40 rows), if any
    if alpha == "auto" and n == 40:
        assert seen[1:] == [pytest.approx(1 / 28)] * 5  # 32 rows a fold, 4 of them held out


def test_forty_rows_do_not_tear_deep_holes():
    # Regression: 36 training rows of two moons (seed 0) with weight decay 1e-3: the couplings
    # ran all 150 epochs on four validation rows and tore holes, 1 % of new rows below -47
    # nats (held-out mean -2.88 against the EM start's -1.76).
    from sklearn.datasets import make_moons

    X, _ = make_moons(40, noise=0.1, random_state=0)
    T, _ = make_moons(5000, noise=0.1, random_state=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = RealNVPDensity(random_state=0, device="cpu").fit(X).score_samples(T)
    assert np.percentile(scores, 1) > -10.0
    assert scores.mean() > -2.2


@pytest.mark.parametrize("early_stopping", [True, False])
def test_fewer_rows_than_features_give_a_shrunk_base_not_a_spike(early_stopping):
    # Regression: 10 rows in 20-D left the one-component base's covariance singular but for
    # reg_covar, and held-out rows scored -4.4e6 nats (-3e3 with scikit-learn's
    # GaussianMixture at reg_covar=1e-3; a diagonal Gaussian: -30). The shrinkage chosen on
    # held-out rows (validation rows and folds of the training rows) keeps them near -30.
    rng = np.random.RandomState(0)
    mixing = rng.standard_normal((20, 20)) / np.sqrt(20)
    X, X_new = rng.standard_normal((10, 20)) @ mixing, rng.standard_normal((2000, 20)) @ mixing
    est = RealNVPDensity(random_state=0, max_iter=1, early_stopping=early_stopping).fit(X)
    assert est.score(X_new) > -45.0


def _start_of(train, seed):
    """The estimator whose couplings cannot move: its fit is the start of training."""
    return RealNVPDensity(
        random_state=seed, device="cpu", max_iter=1, learning_rate_init=1e-12
    ).fit(train)


def _split_only(train, seed):
    """The default fit with the validation split alone deciding about the couplings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return RealNVPDensity(random_state=seed, device="cpu", couplings_cv=None).fit(train)


def test_couplings_that_beat_the_start_by_noise_are_not_kept():
    # Iris, 101 training and 11 validation rows: the best epoch scored the validation rows
    # 0.12 nat above the Gaussian-mixture start, 0.6 standard errors; the trained flow scored
    # the 38 test rows 0.05 nat below the start. The start is kept: the fit is the same model
    # as one whose couplings cannot move.
    from sklearn.datasets import load_iris

    X = load_iris().data
    order = np.random.default_rng(5).permutation(len(X))
    train, test = X[order[:112]], X[order[112:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = RealNVPDensity(random_state=5, device="cpu").fit(train)
        start = _start_of(train, seed=5)
    assert fitted.n_iter_ > 1
    assert fitted.best_validation_score_ < max(fitted.validation_scores_)
    np.testing.assert_allclose(fitted.score_samples(test), start.score_samples(test), rtol=1e-9)


def _iris_split(seed):
    """benchmarks/bench_small.py's split of iris: 112 training and 38 test rows."""
    from sklearn.datasets import load_iris

    X = load_iris().data
    order = np.random.default_rng(seed).permutation(len(X))
    return X[order[:112]], X[order[112:]]


def test_couplings_that_lose_out_of_fold_are_not_kept():
    # Iris, seed 8: the best epoch beat the Gaussian-mixture start on the 12 validation rows
    # by 2.5 standard errors, and the trained flow scored the 38 test rows 0.74 nat a row
    # below the start (-2.89 against -2.15). The same fit repeated without each of five
    # folds of the 112 rows scored the held-out rows below its own start, so the start is
    # kept (the fit is then the same model as one whose couplings cannot move).
    train, test = _iris_split(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = RealNVPDensity(random_state=8, device="cpu").fit(train)
        start = _start_of(train, seed=8)
    assert fitted.n_iter_ > 1 and fitted.best_validation_score_ < max(fitted.validation_scores_)
    # (The kept start is the float64 one; the reference's went through float32 training.)
    np.testing.assert_allclose(fitted.score_samples(test), start.score_samples(test), rtol=1e-6)


def _count_trainings(monkeypatch) -> list:
    """A list that grows by one for every training run (the fit's and each refit's)."""
    calls = []
    train = RealNVPDensity._train

    def counting(self, *args, **kwargs):
        calls.append(1)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(RealNVPDensity, "_train", counting)
    return calls


def test_couplings_that_gain_out_of_fold_are_kept(capsys, monkeypatch):
    # 300 rows of two moons on a standard normal base: the couplings are the whole model,
    # and out of fold they beat their start by many standard errors.
    X = datasets.make_moons(300, noise=0.05, random_state=0)
    T = datasets.make_moons(2000, noise=0.05, random_state=1)
    fitted = RealNVPDensity(base="normal", max_iter=30, random_state=0, device="cpu", verbose=1)
    calls = _count_trainings(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted.fit(X)
    monkeypatch.undo()
    assert "trained kept" in capsys.readouterr().out
    assert len(calls) == 1 + 5  # the fit (2-D: no whitening candidate), then each fold's
    start = RealNVPDensity(base="normal", max_iter=1, learning_rate_init=1e-12, random_state=0)
    assert fitted.score(T) > start.fit(X).score(T) + 0.5


def test_out_of_fold_check_needs_at_most_a_thousand_rows():
    rows = RealNVPDensity()._cross_validation_rows
    assert rows(np.ones(1001)) is None
    weights = np.ones(1010)
    weights[[0, 5, 9, 20, 30, 40, 50, 60, 70, 80]] = 0.0  # 1,000 rows with positive weight
    np.testing.assert_array_equal(rows(weights), np.flatnonzero(weights))
    assert rows(np.ones(9)) is None  # too few for five folds
    np.testing.assert_array_equal(rows(np.ones(10)), np.arange(10))
    assert RealNVPDensity(couplings_cv=3)._cross_validation_rows(np.ones(6)) is not None
    assert RealNVPDensity(couplings_cv=None)._cross_validation_rows(np.ones(100)) is None


@pytest.mark.parametrize("couplings_cv, refits", [(None, 0), (3, 3)])
def test_couplings_cv_sets_the_number_of_refits(monkeypatch, couplings_cv, refits):
    calls = _count_trainings(monkeypatch)
    X = datasets.make_moons(300, noise=0.05, random_state=0)
    est = RealNVPDensity(base="normal", max_iter=10, couplings_cv=couplings_cv,
                         random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    assert len(calls) == 1 + refits


@pytest.mark.parametrize("bad", [0, 1, 2.5, "5"])
def test_couplings_cv_is_validated(bad):
    from sklearn.utils._param_validation import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="couplings_cv"):
        RealNVPDensity(couplings_cv=bad).fit(np.random.RandomState(0).normal(size=(20, 2)))


def test_a_fold_that_cannot_be_fitted_leaves_the_choice_to_the_validation_rows(monkeypatch):
    # The validation rows' one-standard-error rule decides, as above the row limit: the same
    # model as a fit whose cross-validation is switched off.
    train, test = _iris_split(8)
    split_only = _split_only(train, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        build = RealNVPDensity._build_module
        calls = []

        def build_once(self, *args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise ValueError("a fold that cannot be fitted")
            return build(self, *args, **kwargs)

        monkeypatch.setattr(RealNVPDensity, "_build_module", build_once)
        fallback = RealNVPDensity(random_state=8, device="cpu").fit(train)
        monkeypatch.undo()
        start = _start_of(train, seed=8)
    assert len(calls) == 2
    assert abs(split_only.score(test) - start.score(test)) > 0.1  # the split kept training
    np.testing.assert_allclose(
        fallback.score_samples(test), split_only.score_samples(test), rtol=1e-9
    )


def test_interrupting_the_out_of_fold_refits_keeps_the_validation_rows_choice(
    monkeypatch, capsys
):
    # Ctrl-C during the refits ends the fit as it does during training: a fitted model, the
    # validation rows' one-standard-error rule, and a warning.
    train, test = _iris_split(8)
    split_only = _split_only(train, seed=8)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RealNVPDensity, "_out_of_fold_rows", interrupted)
    with pytest.warns(UserWarning, match="interrupted"):
        fitted = RealNVPDensity(random_state=8, device="cpu", verbose=1).fit(train)
    assert "start, on the validation rows:" in capsys.readouterr().out
    np.testing.assert_allclose(
        fitted.score_samples(test), split_only.score_samples(test), rtol=1e-9
    )


def test_start_sees_every_row_once_its_size_is_chosen(monkeypatch):
    # Where EM chooses the size on a subsample (many rows in many dimensions: 3,051 of 4,500
    # in 128-D), one more EM run at that size fits the start to every training row: a 128-D
    # Gaussian from the subsample scored new rows 0.35 nat below one from all rows. Here the
    # budget is shrunk so that 200 of 2,000 rows choose the size; the single component's mean
    # is then the mean of all rows, 0 in the standardised coordinates.
    monkeypatch.setattr(density_module, "_EM_MIN_ROWS", 200)
    monkeypatch.setattr(density_module, "_EM_BUDGET", 200 * 4**2)
    assert density_module._em_row_cap(4) == 200
    X = np.random.RandomState(0).randn(2000, 4) @ np.diag([1.0, 2.0, 3.0, 4.0])
    est = RealNVPDensity(n_components=1, random_state=0)
    sizes, mask = est._check_params(4)
    flow = est._build_module(X, np.ones(2000), sizes, mask, False, 0)
    np.testing.assert_allclose(flow.base.means.detach().numpy(), 0.0, atol=1e-10)
