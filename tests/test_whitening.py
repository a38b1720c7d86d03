"""Full-covariance whitening at the start of the flow (``whiten``) and its ``"auto"`` choice."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from sknvp import RealNVPDensity, RealNVPImageDensity
from sknvp.flows import build_realnvp
from sknvp.transforms import TriangularWhitening

# Whitening is a standard normal base's start; "auto" compares it only there.
TINY = {"n_couplings": 2, "hidden_layer_sizes": (8,), "random_state": 0, "device": "cpu",
        "base": "normal"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _correlated(n, d=4, seed=0):
    rng = np.random.RandomState(seed)
    A = rng.normal(size=(d, d)) + 2 * np.eye(d)
    return rng.normal(size=(n, d)) @ A.T + rng.normal(size=d) * 5


def _random_chol(d, seed):
    gen = torch.Generator().manual_seed(seed)
    chol = torch.tril(torch.randn(d, d, generator=gen, dtype=torch.float64))
    chol.diagonal().copy_(torch.rand(d, generator=gen, dtype=torch.float64) + 0.2)
    return chol


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_whitening_layer_is_exactly_invertible_with_the_autograd_log_det(d, seed):
    layer = TriangularWhitening(_random_chol(d, seed))
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    z, log_det = layer(x)
    back, inv_log_det = layer.inverse(z)
    torch.testing.assert_close(back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inv_log_det, -log_det)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.unsqueeze(0))[0][0], x[0])
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jac)[1])


def test_whitening_layer_stays_invertible_after_a_float32_round_trip():
    # Training casts the flow to float32 and back. A stored inverse matrix is rounded apart
    # from the factor then (round trips off by ~1e-7); the solve keeps them consistent.
    gen = torch.Generator().manual_seed(0)
    # A factor like that of a correlation matrix: unit diagonal, moderate off-diagonal terms
    # (random triangular matrices are ill-conditioned far beyond what the data give).
    chol = torch.eye(20, dtype=torch.float64) + 0.3 * torch.tril(
        torch.randn(20, 20, generator=gen, dtype=torch.float64), diagonal=-1
    )
    layer = TriangularWhitening(chol).float().double()
    x = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, atol=1e-10, rtol=1e-10)


def test_whitening_layer_rejects_bad_factors():
    with pytest.raises(ValueError, match="square"):
        TriangularWhitening(torch.ones(2, 3))
    with pytest.raises(ValueError, match="positive diagonal"):
        TriangularWhitening(torch.tensor([[1.0, 0.0], [0.5, 0.0]]))


def test_flow_with_whitening_starts_as_the_full_covariance_gaussian():
    X = _correlated(400)
    loc, scale = X.mean(0), X.std(0)
    corr = np.corrcoef(X, rowvar=False)
    flow = build_realnvp(
        4, 2, (8,), loc=torch.as_tensor(loc), scale=torch.as_tensor(scale),
        whitening=torch.as_tensor(np.linalg.cholesky(corr)),
    ).double()
    # The conditioners' last layers start at zero, so the couplings are the identity.
    got = flow.log_prob(torch.as_tensor(X)).detach().numpy()
    want = multivariate_normal(loc, np.cov(X, rowvar=False, bias=True)).logpdf(X)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_whiten_true_before_training_is_the_weighted_gaussian_fit():
    # A learning rate too small to move the weights leaves the initial model: the Gaussian
    # with the weighted mean and covariance of the training rows (plus the 1e-6 ridge on the
    # correlation matrix).
    X = _correlated(300)
    w = np.random.RandomState(1).uniform(0.2, 2.0, size=len(X))
    est = RealNVPDensity(
        **TINY, whiten=True, max_iter=1, learning_rate_init=1e-30, early_stopping=False,
        dtype="float64",  # float32 training would round the fixed layers to 1e-7
    ).fit(X, sample_weight=w)
    assert est.whiten_ is True
    mean = np.average(X, axis=0, weights=w)
    cov = np.cov(X, rowvar=False, aweights=w, bias=True)
    sd = np.sqrt(np.diag(cov))
    cov = cov + 1e-6 * np.outer(sd, sd) * np.eye(4)
    want = multivariate_normal(mean, cov).logpdf(X)
    np.testing.assert_allclose(est.score_samples(X), want, rtol=1e-9, atol=1e-9)


def test_whitening_beats_standardising_on_a_short_fit_of_correlated_data():
    X, X_test = _correlated(600), _correlated(600, seed=0)[::-1]
    kw = dict(TINY, max_iter=3, early_stopping=False)
    whitened = RealNVPDensity(**kw, whiten=True).fit(X)
    plain = RealNVPDensity(**kw, whiten=False).fit(X)
    assert whitened.score(X_test) > plain.score(X_test) + 1.0


@pytest.mark.parametrize("d", [3, 5])
def test_auto_keeps_the_candidate_with_the_better_validation_score(d):
    X = _correlated(300, d=d)
    kw = dict(TINY, max_iter=4)
    auto = RealNVPDensity(**kw).fit(X)
    fixed = {w: RealNVPDensity(**kw, whiten=w).fit(X) for w in (False, True)}
    scores = {w: e.best_validation_score_ for w, e in fixed.items()}
    chosen = max(scores, key=scores.get)
    assert auto.whiten_ is chosen
    assert auto.best_validation_score_ == scores[chosen]
    assert auto.n_iter_ == fixed[chosen].n_iter_
    np.testing.assert_allclose(auto.score_samples(X), fixed[chosen].score_samples(X))
    has_layer = any(isinstance(m, TriangularWhitening) for m in auto.module_.modules())
    assert has_layer is chosen


def test_auto_does_not_whiten_in_two_dimensions_or_without_validation_rows(rng):
    X = rng.normal(size=(200, 2))
    assert RealNVPDensity(**TINY, max_iter=2).fit(X).whiten_ is False
    X3 = _correlated(200, d=3)
    est = RealNVPDensity(**TINY, max_iter=2, early_stopping=False).fit(X3)
    assert est.whiten_ is False
    assert not any(isinstance(m, TriangularWhitening) for m in est.module_.modules())


def test_auto_trains_each_candidate_once(monkeypatch):
    calls = []
    original = RealNVPDensity._train

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RealNVPDensity, "_train", counting)
    # (Not the out-of-fold check's refits of the kept candidate: tests/test_mixture_base.py.)
    tiny = {**TINY, "couplings_cv": None}
    RealNVPDensity(**tiny, max_iter=2).fit(_correlated(100, d=3))
    assert len(calls) == 2
    calls.clear()
    RealNVPDensity(**tiny, max_iter=2, whiten=False).fit(_correlated(100, d=3))
    assert len(calls) == 1
    calls.clear()  # a mixture base starts from full covariances: nothing to compare
    est = RealNVPDensity(**{**tiny, "base": "mixture"}, max_iter=2).fit(_correlated(100, d=3))
    assert len(calls) == 1 and est.whiten_ is False


def test_whitening_handles_collinear_and_wide_data(rng):
    base = rng.normal(size=(60, 3))
    collinear = np.column_stack([base, base[:, 0] * 2 + 1])  # exactly dependent column
    wide = rng.normal(size=(12, 20))  # fewer rows than features
    for X in (collinear, wide):
        est = RealNVPDensity(**TINY, whiten=True, max_iter=2, early_stopping=False).fit(X)
        assert np.all(np.isfinite(est.score_samples(X)))
        np.testing.assert_allclose(est.inverse_transform(est.transform(X)), X, atol=1e-6)


def test_whitened_model_survives_pickle_clone_and_warm_start():
    X = _correlated(200)
    est = RealNVPDensity(**TINY, whiten=True, max_iter=2, warm_start=True).fit(X)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.score_samples(X), est.score_samples(X))
    assert clone(est).get_params()["whiten"] is True
    est.fit(X)  # a warm start keeps the whitened flow
    assert est.whiten_ is True and est.n_iter_ == 4


def test_partial_fit_whitens_from_the_first_chunk_only_when_asked():
    X = _correlated(200)
    est = RealNVPDensity(**TINY, whiten=True).partial_fit(X)
    assert est.whiten_ is True
    assert RealNVPDensity(**TINY).partial_fit(X).whiten_ is False  # "auto": no validation rows


@pytest.mark.parametrize("cls", [RealNVPDensity, RealNVPImageDensity])
def test_parameter_constraints_name_exactly_the_parameters(cls):
    # The image estimator inherited a constraint for inference_dtype, which it does not take
    # (scikit-learn's check_param_validation asserts the two sets are equal).
    assert set(cls._parameter_constraints) == set(cls().get_params())


def test_permuted_mask_in_the_estimator_is_seeded_and_equals_alternating_in_2d(rng):
    X6 = _correlated(200, d=6)
    kw = dict(TINY, n_couplings=6, max_iter=2, whiten=False)
    a = RealNVPDensity(**kw, mask="permuted").fit(X6)
    b = RealNVPDensity(**kw, mask="permuted").fit(X6)
    masks = [m.mask for m in a.module_.modules() if hasattr(m, "mask")]
    assert torch.equal(torch.stack(masks), torch.stack(
        [m.mask for m in b.module_.modules() if hasattr(m, "mask")]))
    assert not torch.equal(torch.stack(masks[2:]), torch.stack(
        [m.mask for m in RealNVPDensity(**kw, mask="alternating").fit(X6).module_.modules()
         if hasattr(m, "mask")][2:]))
    X2 = rng.normal(size=(200, 2))
    np.testing.assert_array_equal(
        RealNVPDensity(**kw).fit(X2).score_samples(X2),  # "permuted", the default
        RealNVPDensity(**kw, mask="alternating").fit(X2).score_samples(X2),
    )
    assert RealNVPDensity().mask == "permuted"


def test_auto_warns_about_a_constant_feature_once(rng):
    X = np.c_[rng.normal(size=(100, 3)), np.ones(100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = RealNVPDensity(**TINY, max_iter=2).fit(X)
    constant = [w for w in caught if "constant" in str(w.message)]
    assert len(constant) == 1
    assert np.all(np.isfinite(est.score_samples(X)))


def test_whiten_attribute_exists_only_after_fit():
    est = RealNVPDensity(**TINY, max_iter=1)
    assert not hasattr(est, "whiten_")
    assert est.fit(_correlated(50, d=3)).whiten_ in (True, False)
