"""Reliability of RealNVPDensity: bad input, bad hyper-parameters, numerical faults, interrupts.

Every bad input must give the exception type scikit-learn's own estimators give, before any
work is done, and must leave a fitted model untouched (same scores, same weights, same fitted
attributes). See docs/reliability.md for the table these tests back.
"""

import copy
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

import sknvp._density as density_module
from sknvp import RealNVPDensity

TINY = {
    "n_couplings": 2,
    "hidden_layer_sizes": (8,),
    "max_iter": 2,
    "batch_size": 16,
    "random_state": 0,
    "device": "cpu",
}
N_FEATURES = 3


@pytest.fixture(autouse=True)
def _one_thread_quiet():
    """One torch thread (the CI box is shared; OpenMP spinning makes tiny steps 100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return np.random.RandomState(0).randn(60, N_FEATURES)


@pytest.fixture(scope="module")
def _fitted_once(data):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(**TINY).fit(data)
    torch.set_num_threads(n)
    return est


@pytest.fixture
def fitted(_fitted_once):
    """A private copy of one fitted model (fitting is the slow part)."""
    return copy.deepcopy(_fitted_once)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a flow is built or trained."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was rejected")

    monkeypatch.setattr(RealNVPDensity, "_build_module", forbidden)
    monkeypatch.setattr(density_module, "fit_flow", forbidden)


def snapshot(est, X):
    """Everything a failing call must not change."""
    return {
        "scores": est.score_samples(X),
        "module": est.module_,
        "state": {k: v.detach().clone() for k, v in est.module_.state_dict().items()},
        "attrs": {k: copy.deepcopy(v) for k, v in vars(est).items() if k != "module_"},
    }


def assert_unchanged(before, est, X):
    after = snapshot(est, X)
    np.testing.assert_array_equal(after["scores"], before["scores"])
    assert after["module"] is before["module"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["attrs"].keys() == before["attrs"].keys()
    for k, v in before["attrs"].items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(after["attrs"][k], v)
        elif k != "_optimizer_state":
            assert after["attrs"][k] == v, k


# ----------------------------------------------------------------------------- bad data


def _with(X, i, j, value):
    X = X.astype(float).copy()
    X[i, j] = value
    return X


NAN_MSG = "Input X contains NaN"
INF_MSG = "Input X contains infinity or a value too large"

# (id, builder(X) -> bad X, exception type, message regex)
BAD_DATA = [
    ("nan", lambda X: _with(X, 0, 0, np.nan), ValueError, NAN_MSG),
    ("inf", lambda X: _with(X, 1, 1, np.inf), ValueError, INF_MSG),
    ("-inf", lambda X: _with(X, 1, 1, -np.inf), ValueError, INF_MSG),
    ("object-None", lambda X: np.array([[None, 1.0, 2.0]] * 5, dtype=object), ValueError, NAN_MSG),
    (
        "empty",
        lambda X: np.empty((0, X.shape[1])),
        ValueError,
        r"Found array with 0 sample\(s\) \(shape=\(0, 3\)\) while a minimum of \d is required",
    ),
    (
        "zero-features",
        lambda X: np.empty((5, 0)),
        ValueError,
        r"0 feature\(s\) \(shape=\(5, 0\)\) while a minimum of 1 is required",
    ),
    ("1-D", lambda X: X[:, 0], ValueError, "Expected 2D array, got 1D array instead"),
    ("scalar", lambda X: 3.0, ValueError, "Expected 2D array, got scalar array instead"),
    (
        "3-D",
        lambda X: X[:30].reshape(10, 3, 3),
        ValueError,
        "Found array with dim 3, while dim <= 2 is required by RealNVPDensity",
    ),
    ("sparse-csr", lambda X: sp.csr_matrix(X), TypeError, "Sparse data was passed for X"),
    ("sparse-coo", lambda X: sp.coo_array(X), TypeError, "Sparse data was passed for X"),
    ("complex", lambda X: X + 1j, ValueError, "Complex data not supported"),
    (
        "strings",
        lambda X: np.array([["a", "b", "c"]] * 5),
        ValueError,
        "could not convert string to float",
    ),
    (
        "object-strings",
        lambda X: np.array([["1", "x", 2.0]] * 5, dtype=object),
        ValueError,
        "could not convert string to float",
    ),
]
INFERENCE = ["score_samples", "score", "transform", "inverse_transform"]


@pytest.mark.parametrize(
    "make, exc, match", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_data_rejected_by_fit_before_any_work(data, make, exc, match, no_work):
    with pytest.raises(exc, match=match):
        RealNVPDensity(**TINY).fit(make(data))


@pytest.mark.parametrize(
    "make, exc, match", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_data_in_refit_leaves_model_untouched(fitted, data, make, exc, match, no_work):
    before = snapshot(fitted, data)
    with pytest.raises(exc, match=match):
        fitted.fit(make(data))
    assert_unchanged(before, fitted, data)


@pytest.mark.parametrize("method", INFERENCE)
@pytest.mark.parametrize(
    "make, exc, match", [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_data_at_inference(fitted, data, method, make, exc, match):
    before = snapshot(fitted, data)
    with pytest.raises(exc, match=match):
        getattr(fitted, method)(make(data))
    assert_unchanged(before, fitted, data)


@pytest.mark.parametrize("method", INFERENCE)
def test_wrong_n_features_at_inference(fitted, data, method):
    before = snapshot(fitted, data)
    msg = "X has 2 features, but RealNVPDensity is expecting 3 features as input."
    with pytest.raises(ValueError, match=re.escape(msg)):
        getattr(fitted, method)(data[:, :2])
    assert_unchanged(before, fitted, data)


@pytest.mark.parametrize("method", INFERENCE + ["sample"])
def test_not_fitted(method, data):
    args = () if method == "sample" else (data,)
    with pytest.raises(NotFittedError, match="is not fitted yet"):
        getattr(RealNVPDensity(**TINY), method)(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_weight": -np.ones(60)}, "Negative values in data passed to `sample_weight`"),
        ({"sample_weight": np.ones(5)}, re.escape("sample_weight.shape == (5,), expected (60,)")),
        ({"sample_weight": np.full(60, np.nan)}, "sample_weight contains NaN"),
        (
            {"sample_weight": np.zeros(60)},
            "Sample weights must contain at least one non-zero number|positive sum",
        ),
    ],
    ids=["negative", "wrong-shape", "nan", "all-zero"],
)
def test_bad_sample_weight(fitted, data, kwargs, match, no_work):
    before = snapshot(fitted, data)
    with pytest.raises(ValueError, match=match):
        fitted.fit(data, **kwargs)
    assert_unchanged(before, fitted, data)


def test_too_few_rows(data, no_work):
    with pytest.raises(ValueError, match=r"1 sample\(s\)"):
        RealNVPDensity(**TINY).fit(data[:1])
    with pytest.raises(ValueError, match="need at least 2"):
        RealNVPDensity(**TINY).fit(data[:2])


def test_warm_start_refit_with_other_n_features(fitted, data, no_work):
    before = snapshot(fitted, data)
    fitted.set_params(warm_start=True)
    with pytest.raises(ValueError, match="X has 2 features, but RealNVPDensity is expecting 3"):
        fitted.fit(data[:, :2])
    fitted.set_params(warm_start=False)
    assert_unchanged(before, fitted, data)


# ------------------------------------------------------------- accepted, converted dtypes


@pytest.mark.parametrize(
    "convert",
    [
        lambda X: np.round(X * 4).astype(np.int64),
        lambda X: np.round(X * 4).astype(np.int32),
        lambda X: np.round(X * 4).astype(np.int16),
        lambda X: np.round(X * 4).astype(np.float16),
        lambda X: np.round(X * 4).astype(np.float32),
        lambda X: np.round(X * 4).tolist(),
        lambda X: pd.DataFrame(np.round(X * 4).astype(np.int64)),
    ],
    ids=["int64", "int32", "int16", "float16", "float32", "list", "int-DataFrame"],
)
def test_numeric_dtypes_are_converted(fitted, data, convert):
    Xr = np.round(data * 4)
    ref = fitted.score_samples(Xr)
    Xc = convert(data)
    for method in INFERENCE:
        out = getattr(fitted, method)(Xc)
        assert np.all(np.isfinite(out))
        if method != "score":
            assert out.dtype == np.float64
    np.testing.assert_allclose(fitted.score_samples(Xc), ref, rtol=1e-12)
    est = RealNVPDensity(**TINY).fit(Xc)
    assert np.all(np.isfinite(est.score_samples(Xc)))


def test_bool_data_is_converted(fitted, data):
    B = data > 0
    np.testing.assert_array_equal(fitted.score_samples(B), fitted.score_samples(B.astype(float)))
    assert np.all(np.isfinite(RealNVPDensity(**TINY).fit(B).score_samples(B)))


# ------------------------------------------------------------------- DataFrame names


@pytest.fixture
def fitted_df(data):
    return RealNVPDensity(**TINY).fit(pd.DataFrame(data, columns=["a", "b", "c"]))


def test_dataframe_fitted_scored_with_ndarray_warns(fitted_df, data):
    with pytest.warns(
        UserWarning,
        match="X does not have valid feature names, but "
        "RealNVPDensity was fitted with feature names",
    ):
        fitted_df.score_samples(data)


def test_ndarray_fitted_scored_with_dataframe_warns(fitted, data):
    with pytest.warns(
        UserWarning,
        match="X has feature names, but RealNVPDensity was fitted without feature names",
    ):
        fitted.score_samples(pd.DataFrame(data, columns=["a", "b", "c"]))


@pytest.mark.parametrize(
    "columns, match",
    [
        (["a", "b", "z"], "Feature names unseen at fit time:\n- z"),
        (["b", "a", "c"], "Feature names must be in the same order as they were in fit"),
    ],
    ids=["renamed", "reordered"],
)
# Not inverse_transform: its columns are the latent space's, whose names (those of
# get_feature_names_out under set_output) are not the data's; as in scikit-learn's own
# inverse transforms only their number is checked (tests/test_density.py).
@pytest.mark.parametrize("method", [m for m in INFERENCE if m != "inverse_transform"])
def test_dataframe_with_other_names_raises(fitted_df, data, method, columns, match):
    names = fitted_df.feature_names_in_.copy()
    with pytest.raises(
        ValueError, match="The feature names should match those that were passed during fit"
    ):
        getattr(fitted_df, method)(pd.DataFrame(data, columns=columns))
    with pytest.raises(ValueError, match=match):
        getattr(fitted_df, method)(pd.DataFrame(data, columns=columns))
    np.testing.assert_array_equal(fitted_df.feature_names_in_, names)


# -------------------------------------------------------------------------- sample()


@pytest.mark.parametrize(
    "n, exc, match",
    [
        (-1, ValueError, "n_samples must be >= 0, got -1"),
        (2.5, TypeError, "n_samples must be an int, got float"),
        (2.0, TypeError, "n_samples must be an int, got float"),
        (True, TypeError, "n_samples must be an int, got bool"),
        (np.bool_(True), TypeError, "n_samples must be an int, got bool"),
        ("3", TypeError, "n_samples must be an int, got str"),
        (None, TypeError, "n_samples must be an int, got NoneType"),
    ],
)
def test_sample_bad_n_samples(fitted, data, n, exc, match):
    before = snapshot(fitted, data)
    with pytest.raises(exc, match=match):
        fitted.sample(n)
    assert_unchanged(before, fitted, data)


@pytest.mark.parametrize("n", [0, 1, np.int64(3), np.int32(2)])
def test_sample_valid_n_samples(fitted, n):
    out = fitted.sample(n, random_state=0)
    assert out.shape == (int(n), N_FEATURES) and out.dtype == np.float64
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "temperature, exc",
    [
        (0, ValueError),
        (0.0, ValueError),
        (-1.0, ValueError),
        (np.inf, ValueError),
        (-np.inf, ValueError),
        (np.nan, ValueError),
        ("1", TypeError),
        (None, TypeError),
        (True, TypeError),
        (np.bool_(True), TypeError),
    ],
)
def test_sample_bad_temperature(fitted, data, temperature, exc):
    before = snapshot(fitted, data)
    with pytest.raises(exc, match="temperature"):
        fitted.sample(3, temperature=temperature)
    assert_unchanged(before, fitted, data)


# ------------------------------------------------------------------ hyper-parameters


def _cuda_unavailable(index=None):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n == 0 if index is None else index >= n


BAD_PARAMS = [
    # InvalidParameterError (a ValueError and a TypeError), from _parameter_constraints
    (
        {"n_couplings": -1},
        InvalidParameterError,
        (
            "'n_couplings' parameter of RealNVPDensity "
            r"must be an int in the range \[1, inf\). Got -1 instead"
        ),
    ),
    ({"n_couplings": 0}, InvalidParameterError, "'n_couplings' parameter"),
    ({"n_couplings": 2.5}, InvalidParameterError, "'n_couplings' parameter"),
    ({"activation": "sigmoidish"}, InvalidParameterError, "'activation' parameter"),
    ({"mask": "diagonal"}, InvalidParameterError, "'mask' parameter"),
    ({"validation_fraction": 0.0}, InvalidParameterError, "'validation_fraction' parameter"),
    ({"validation_fraction": 1.0}, InvalidParameterError, "'validation_fraction' parameter"),
    ({"validation_fraction": -0.1}, InvalidParameterError, "'validation_fraction' parameter"),
    ({"validation_fraction": 1.5}, InvalidParameterError, "'validation_fraction' parameter"),
    ({"scale_bound": 0}, InvalidParameterError, "'scale_bound' parameter"),
    ({"max_iter": 0}, InvalidParameterError, "'max_iter' parameter"),
    ({"batch_size": 0}, InvalidParameterError, "'batch_size' parameter"),
    ({"learning_rate_init": -1.0}, InvalidParameterError, "'learning_rate_init' parameter"),
    ({"learning_rate": "adaptive"}, InvalidParameterError, "'learning_rate' parameter"),
    ({"alpha": -1.0}, InvalidParameterError, "'alpha' parameter"),
    ({"tol": -1.0}, InvalidParameterError, "'tol' parameter"),
    ({"n_iter_no_change": 0}, InvalidParameterError, "'n_iter_no_change' parameter"),
    ({"early_stopping": "yes"}, InvalidParameterError, "'early_stopping' parameter"),
    ({"dtype": "float16"}, InvalidParameterError, "'dtype' parameter"),
    ({"device": 3}, InvalidParameterError, "'device' parameter"),
    ({"hidden_layer_sizes": "ab"}, InvalidParameterError, "'hidden_layer_sizes' parameter"),
    # data-dependent checks: ValueError, as sklearn's for n_components > n_samples
    ({"hidden_layer_sizes": (0,)}, ValueError, "hidden_layer_sizes must be positive integers"),
    ({"hidden_layer_sizes": (8, -1)}, ValueError, "hidden_layer_sizes must be positive"),
    (
        {"mask": np.ones((2, 2))},
        ValueError,
        re.escape("Expected mask of shape (n_couplings, n_features) = (2, 3), got (2, 2)"),
    ),
    ({"mask": np.ones(3)}, ValueError, "Expected mask of shape"),
    ({"mask": [[0, 2, 1], [1, 0, 0]]}, ValueError, "Expected a binary mask"),
    ({"mask": [[0.5, 1, 0], [1, 0, 0]]}, ValueError, "Expected a binary mask"),
    ({"mask": [[1, 0, 1], [1, 1, 0]]}, ValueError, r"never transforms feature\(s\) \[0\]"),
    ({"device": "tpu"}, ValueError, "Unknown device 'tpu'"),
    ({"device": "gpu0"}, ValueError, "Unknown device 'gpu0'"),
]
if _cuda_unavailable():
    BAD_PARAMS.append(({"device": "cuda"}, ValueError, "device='cuda' is not available"))
if _cuda_unavailable(7):
    BAD_PARAMS.append(({"device": "cuda:7"}, ValueError, "device='cuda:7' is not available"))
if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
    BAD_PARAMS.append(({"device": "mps"}, ValueError, "device='mps' is not available"))


def _param_id(case):
    ((key, value),) = case[0].items()
    return f"{key}={value!r}".replace("\n", "")[:40]


@pytest.mark.parametrize("params, exc, match", BAD_PARAMS, ids=[_param_id(c) for c in BAD_PARAMS])
def test_bad_hyper_parameter_rejected_before_any_work(data, params, exc, match, no_work):
    with pytest.raises(exc, match=match) as info:
        RealNVPDensity(**{**TINY, **params}).fit(data)
    if exc is InvalidParameterError:
        assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize("params, exc, match", BAD_PARAMS, ids=[_param_id(c) for c in BAD_PARAMS])
def test_bad_hyper_parameter_in_refit_leaves_model_untouched(
    fitted, data, params, exc, match, no_work
):
    before = snapshot(fitted, data)
    good = fitted.get_params()
    fitted.set_params(**params)
    with pytest.raises(exc, match=match):
        fitted.fit(data)
    fitted.set_params(**good)
    assert_unchanged(before, fitted, data)


@pytest.mark.parametrize("params, exc, match", BAD_PARAMS, ids=[_param_id(c) for c in BAD_PARAMS])
def test_failing_refit_on_other_shaped_data_leaves_model_untouched(
    fitted, data, params, exc, match, no_work
):
    """A refit that fails after validate_data reset n_features_in_ must undo that reset."""
    before = snapshot(fitted, data)
    good = fitted.get_params()
    fitted.set_params(**params)
    other = pd.DataFrame(np.random.RandomState(1).randn(40, 3), columns=["u", "v", "w"])
    with pytest.raises((ValueError, TypeError)):
        fitted.fit(other)
    fitted.set_params(**good)
    assert_unchanged(before, fitted, data)


@pytest.mark.parametrize("call", ["warm_start", "partial_fit"])
def test_refit_failing_during_training_leaves_model_untouched(fitted, data, call, monkeypatch):
    """Training of a fitted model works on a copy: an error after some steps changed its
    weights must not reach ``module_`` (a fresh fit trains the module it built in place)."""
    before = snapshot(fitted, data)
    real_fit_flow = density_module.fit_flow

    def fails_after_training(module, *args, **kwargs):
        real_fit_flow(module, *args, **kwargs)  # the weights move ...
        raise RuntimeError("failed after training")  # ... then something breaks

    monkeypatch.setattr(density_module, "fit_flow", fails_after_training)
    with pytest.raises(RuntimeError, match="failed after training"):
        if call == "warm_start":
            fitted.set_params(warm_start=True).fit(data)
        else:
            fitted.partial_fit(data)
    fitted.set_params(warm_start=False)
    assert_unchanged(before, fitted, data)


def test_failing_first_fit_leaves_estimator_unfitted(data):
    est = RealNVPDensity(**{**TINY, "mask": [[1, 0, 1], [1, 1, 0]]})
    with pytest.raises(ValueError, match="never transforms"):
        est.fit(pd.DataFrame(data, columns=["a", "b", "c"]))
    assert not hasattr(est, "n_features_in_") and not hasattr(est, "feature_names_in_")
    with pytest.raises(NotFittedError):
        est.score_samples(data)


def test_failing_refit_with_other_n_features_leaves_model_untouched(fitted, data, no_work):
    before = snapshot(fitted, data)
    mask = fitted.mask
    fitted.set_params(mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match="never transforms"):
        fitted.fit(np.random.RandomState(1).randn(40, 2))
    fitted.set_params(mask=mask)
    assert fitted.n_features_in_ == N_FEATURES
    assert_unchanged(before, fitted, data)


# ------------------------------------------------------------------- numerical faults


@pytest.mark.parametrize(
    "temperature",
    [1e-300, 1e-8, 0.1, 1, 3, 1e3, 1e10, 1e100, 1e300, 1e307, 1e308, np.finfo(np.float64).max],
)
def test_sample_is_finite_at_every_accepted_temperature(fitted, temperature):
    """Either finite samples, or (only where they overflow float64) a clear ValueError."""
    try:
        out = fitted.sample(500, random_state=0, temperature=temperature)
    except ValueError as exc:
        assert temperature > 1e300, "only float64 overflow may refuse a valid temperature"
        assert "too large" in str(exc) and "overflow" in str(exc)
        return
    assert out.shape == (500, N_FEATURES)
    assert np.all(np.isfinite(out))


@pytest.fixture(scope="module")
def fitted_2d():
    """A 2-D model trained long enough to have a non-trivial shape."""
    from sklearn.datasets import make_moons

    X, _ = make_moons(300, noise=0.05, random_state=0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(
            n_couplings=4,
            hidden_layer_sizes=(16,),
            max_iter=15,
            batch_size=32,
            learning_rate_init=5e-3,
            random_state=0,
            device="cpu",
        ).fit(X)
    torch.set_num_threads(n)
    return est, X


FAR = [10.0, 1e3, 1e6, 1e30, 1e100, 1e150, 1e200, 1e300]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_far_points_get_finite_low_ordered_log_densities(fitted_2d, activation):
    est, X = fitted_2d
    if activation != est.activation:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est = RealNVPDensity(**{**est.get_params(), "activation": activation}).fit(X)
    lowest = -np.finfo(np.float64).max
    center, std = X.mean(0), X.std(0)
    directions = np.random.RandomState(0).randn(12, 2)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    floor = est.score_samples(X).min()
    for u in directions:
        points = center + np.outer(FAR, u * std)
        assert np.all(np.isfinite(points))
        s = est.score_samples(points)
        assert s.dtype == np.float64 and s.shape == (len(FAR),)
        assert not np.any(np.isnan(s)) and np.all(np.isfinite(s)), s
        assert np.all(s >= lowest)
        assert np.all(s[1:] < floor - 100)  # 1e3 std away and beyond: far below any data point
        assert np.all(np.diff(s) <= 0), s  # farther is never higher ...
        strict = np.array(FAR[1:]) <= 1e100  # ... and strictly lower while -|z|^2/2 is finite
        assert np.all(np.diff(s)[strict] < 0), s
    # Beyond ~1e154 standard deviations log p is below -1.8e308: the lowest finite float.
    assert est.score_samples(center + 1e300 * std[None, :])[0] == lowest
    assert est.score(center + np.outer([1e3, 1e30], std)) < floor


def test_far_points_score_samples_row_independent(fitted_2d):
    """Clamping a far row to the lowest float never changes the other rows of the batch."""
    est, X = fitted_2d
    mixed = np.vstack([X[:5], np.full((1, 2), 1e300), X[5:10]])
    s = est.score_samples(mixed)
    np.testing.assert_allclose(np.delete(s, 5), est.score_samples(X[:10]), rtol=1e-12)


def _all_finite(est):
    return all(
        bool(torch.isfinite(t).all())
        for t in est.module_.state_dict().values()
        if t.is_floating_point()
    )


_RECORDING = {
    "n_couplings": 4,
    "hidden_layer_sizes": (16,),
    "max_iter": 12,
    "batch_size": 32,
    "random_state": 0,
    "device": "cpu",
}


def _fit_recording(X, **params):
    params = {**_RECORDING, **params}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = RealNVPDensity(**params).fit(X)
    return est, caught


def _moons(n=200):
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.05, random_state=0)[0]


HARD_DATA = {
    "duplicated-points": lambda: np.repeat(_moons()[:5], 40, axis=0),
    "all-rows-identical": lambda: np.ones((100, 2)),
    "constant-feature": lambda: np.c_[_moons()[:, 0], np.full(200, 3.0)],
    "identical-features": lambda: np.c_[_moons()[:, 0], _moons()[:, 0]],
    "values-around-1e8": lambda: _moons() * 1e3 + 1e8,
    "values-scaled-1e8": lambda: _moons() * 1e8,
    "values-tiny-1e-200": lambda: _moons() * 1e-200,
}


@pytest.mark.parametrize("name", list(HARD_DATA))
def test_degenerate_data_never_leave_non_finite_weights(name):
    X = HARD_DATA[name]()
    est, caught = _fit_recording(X)
    assert _all_finite(est)
    assert all(np.isfinite(v) for v in est.loss_curve_)
    s = est.score_samples(X)
    assert np.all(np.isfinite(s))
    assert np.all(np.isfinite(est.sample(200, random_state=0)))
    assert np.all(np.isfinite(est.transform(X)))
    if name in ("all-rows-identical", "constant-feature", "values-tiny-1e-200"):
        assert any("constant" in str(w.message) for w in caught)


@pytest.mark.parametrize("early_stopping", [True, False])
def test_huge_learning_rate_keeps_finite_weights_and_warns(early_stopping):
    X = _moons()
    est, caught = _fit_recording(X, learning_rate_init=10.0, early_stopping=early_stopping)
    assert _all_finite(est)
    assert np.all(np.isfinite(est.score_samples(X)))
    assert np.all(np.isfinite(est.sample(100, random_state=0)))
    advice = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ConvergenceWarning) and "learning_rate_init" in str(w.message)
    ]
    assert advice, [str(w.message) for w in caught]
    # fit_flow restores the best weights (by validation score, else by training loss)
    assert re.search(r"kept (the weights of epoch \d+|the initial weights)", advice[0]), advice


def test_a_first_step_that_ruins_the_flow_is_undone_without_validation_rows():
    # lr=10 with weight decay: the first steps push the training loss to 1e21 nats and every
    # later epoch lowers it (to 4e19), so no "rose" and no non-finite value; the initial
    # weights were never scored exactly and the ruin was kept with a max_iter warning only.
    X = _moons()
    start = RealNVPDensity(**{**_RECORDING, "max_iter": 1, "learning_rate_init": 1e-300,
                              "early_stopping": False}).fit(X)
    est, caught = _fit_recording(X, learning_rate_init=10.0, early_stopping=False, alpha=1e-3)
    assert est.loss_curve_[-1] > 1e6  # the steps themselves ruined the flow
    np.testing.assert_allclose(est.score(X), start.score(X), rtol=1e-6)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert any("unstable" in m and "kept the initial weights" in m for m in msgs), msgs


def test_unbounded_scales_diverge_to_best_finite_weights():
    """scale_bound=50 lets exp(s) overflow: training stops, keeps finite weights, advises."""
    X = _moons()
    est, caught = _fit_recording(X, learning_rate_init=10.0, scale_bound=50.0)
    assert _all_finite(est)
    assert np.all(np.isfinite(est.score_samples(X)))
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert any("non-finite" in m and "learning_rate_init" in m for m in msgs), msgs


def test_values_near_float64_limit_train_in_float64():
    """Scaling X by 1e300 only shifts log p by -2 log(1e300) (standardisation is exact)."""
    X = _moons()
    est, _ = _fit_recording(X * 1e300, dtype="float64", max_iter=3)
    ref, _ = _fit_recording(X, dtype="float64", max_iter=3)
    assert _all_finite(est)
    s = est.score_samples(X * 1e300)
    np.testing.assert_allclose(s + 2 * np.log(1e300), ref.score_samples(X), atol=1e-6)
    sample = est.sample(50, random_state=0)
    assert np.all(np.isfinite(sample))
    np.testing.assert_allclose(sample / 1e300, ref.sample(50, random_state=0), atol=1e-9)


def test_large_offset_is_exact_in_float64():
    """A constant offset of 1e8 leaves log-densities unchanged when training in float64."""
    X = _moons()
    est, caught = _fit_recording(X + 1e8, dtype="float64")
    ref, _ = _fit_recording(X, dtype="float64")
    assert not any("float32" in str(w.message) for w in caught)
    np.testing.assert_allclose(est.score_samples(X + 1e8), ref.score_samples(X), atol=1e-5)


@pytest.mark.parametrize(("offset", "unit"), [(1e8, 1.0), (1e6, 1e-3), (-3e4, 1e-5)])
def test_large_offset_trains_in_float32_as_centred_data_do(offset, unit):
    """float32 holds 1e8 + x only to steps of 8 (16 standard deviations of moons): training
    centres the rows in float64 before the cast and keeps the centre in float64, so the fit
    is that of the centred rows. (Casting first scored held-out rows of 1e6 + 1e-3 x at -1e7
    nats instead of -2.8, with a warning.)"""
    X = _moons()
    est, caught = _fit_recording(offset + unit * X, dtype="float32", max_iter=5)
    ref, _ = _fit_recording(X, dtype="float32", max_iter=5)
    assert not any("float32" in str(w.message) for w in caught)
    assert est.module_.transform[0].loc.dtype == torch.float64
    shift = 2 * np.log(unit)  # log-densities in the units of the data
    np.testing.assert_allclose(
        est.score_samples(offset + unit * X) + shift, ref.score_samples(X), atol=1e-3
    )
    assert abs(est.sample(500, random_state=0).mean(0) - offset).max() < 2 * unit


def test_float32_inference_centres_the_rows_in_float64():
    """inference_dtype='float32' on 1e6 + 1e-3 x: the rows are centred in float64 before the
    cast, so scores, transforms, their inverse and samples agree with float64 inference
    (casting first put the rows, and the centre, 60 standard deviations off)."""
    X = 1e6 + 1e-3 * _moons()
    est, _ = _fit_recording(X, max_iter=3)
    exact = est.score_samples(X), est.transform(X[:50]), est.sample(200, random_state=0)
    est.set_params(inference_dtype="float32")
    np.testing.assert_allclose(est.score_samples(X), exact[0], atol=1e-3)
    z = est.transform(X[:50])
    np.testing.assert_allclose(z, exact[1], atol=1e-3)
    np.testing.assert_allclose(est.inverse_transform(z), X[:50], rtol=0, atol=1e-8)
    np.testing.assert_allclose(est.sample(200, random_state=0), exact[2], rtol=0, atol=1e-8)
    assert est.module_.transform[0].loc.dtype == torch.float64  # the model is not touched
    np.testing.assert_allclose(est.module_.transform[0].loc.numpy(), X.mean(0), atol=1e-9)


def test_float32_training_keeps_the_centre_in_float64_through_warm_starts():
    X = _moons() + 1e6  # float32 steps of 0.0625 here
    params = {**TINY, "dtype": "float32", "warm_start": True, "early_stopping": False}
    est = RealNVPDensity(**params).fit(X)
    centre = torch.as_tensor(X.mean(0))
    torch.testing.assert_close(est.module_.transform[0].loc, centre, rtol=0, atol=1e-9)
    before = est.score(X)
    est.set_params(max_iter=1).fit(X)
    assert est.n_iter_ == TINY["max_iter"] + 1
    torch.testing.assert_close(est.module_.transform[0].loc, centre, rtol=0, atol=1e-9)
    assert abs(est.score(X) - before) < 0.5


def test_values_beyond_float32_range_rejected_before_any_work(no_work):
    X = _moons() * 1e300
    with pytest.raises(ValueError, match="float32"):
        RealNVPDensity(**{**TINY, "dtype": "float32"}).fit(X)


def _outcome_warnings(est, **fields):
    from sknvp._training import TrainResult

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est._warn_outcome(TrainResult(**fields))
    return [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_unstable_warning_when_no_epoch_beat_the_initial_weights():
    """A loss that exploded in the first epoch and then fell slowly still gets advice."""
    est = RealNVPDensity(**TINY)
    msgs = _outcome_warnings(
        est,
        loss_curve=[5e22, 4e22, 3e22],
        validation_scores=[-6e22, -4e22, -3e22],
        n_iter=3,
        best_epoch=-1,
        best_score=-2.8,
        converged=True,
    )
    assert any(
        "unstable" in m and "initial weights" in m and "learning_rate_init" in m for m in msgs
    ), msgs


def test_no_unstable_warning_on_gaussian_data_where_the_initial_model_is_best():
    est = RealNVPDensity(**TINY)
    msgs = _outcome_warnings(
        est,
        loss_curve=[2.81, 2.80, 2.80],
        validation_scores=[-2.85, -2.84, -2.84],
        n_iter=3,
        best_epoch=-1,
        best_score=-2.83,
        converged=True,
    )
    assert msgs == []


def test_loss_jump_after_a_learning_rate_drop_is_not_called_unstable():
    """A drop restores the best weights: a training loss that overfitting had pushed below
    them jumps back up. That is the restore, not instability (the plateau rule's curves)."""
    est = RealNVPDensity(**TINY)
    fields = dict(
        loss_curve=[7.1, 6.2, 5.5, 7.1, 7.08, 7.07],
        validation_scores=[-6.7, -9.0, -60.0, -6.66, -6.66, -6.66],
        n_iter=6,
        best_epoch=3,
        best_score=-6.66,
        converged=True,
        lr_drops=[2],
    )
    assert _outcome_warnings(est, **fields) == []
    # The same rise after the last drop is still reported, with that stretch's figures.
    fields["loss_curve"] = [7.1, 6.2, 5.5, 5.0, 5.5, 7.07]
    msgs = _outcome_warnings(est, **fields)
    assert any("unstable" in m and "ended at 7.07" in m and "best 5)" in m for m in msgs), msgs


def test_overfitting_tiny_data_restored_by_a_drop_is_not_called_unstable():
    """50 Gaussian rows in 5-D: the flow overfits from the first epoch, the plateau rule
    restores the initial weights and trains on at a tenth of the rate; no instability."""
    X = np.random.default_rng(0).normal(size=(50, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = RealNVPDensity(max_iter=60, whiten=False, random_state=0, device="cpu").fit(X)
    assert est.lr_drops_  # the case this test is about
    assert not [w for w in caught if "unstable" in str(w.message)]


def test_overfitting_from_the_first_epoch_is_reported_as_such_not_as_instability():
    """The training loss falls steadily while the validation score falls from the first
    epoch: overfitting, not instability (the advice to lower the learning rate was wrong)."""
    est = RealNVPDensity(**TINY)
    msgs = _outcome_warnings(
        est,
        loss_curve=[421.1, 414.3, 408.1, 402.3, 398.8],
        validation_scores=[-430.0, -429.9, -430.3, -430.8, -431.1],
        n_iter=5,
        best_epoch=-1,
        best_score=-429.2,
        converged=False,
    )
    assert len(msgs) == 1, msgs
    assert "overfits" in msgs[0] and "initial weights" in msgs[0] and "-431.1" in msgs[0]
    assert "unstable" not in msgs[0] and "learning_rate_init" not in msgs[0]


def test_few_rows_in_many_dimensions_warn_of_overfitting():
    X = np.random.default_rng(0).normal(size=(50, 300))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = RealNVPDensity(max_iter=5, random_state=0, device="cpu").fit(X)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert est.best_validation_score_ is not None
    assert any("overfits" in m for m in msgs), msgs
    assert not any("unstable" in m for m in msgs), msgs


def test_ordinary_training_is_not_called_unstable():
    _, caught = _fit_recording(_moons(), learning_rate_init=5e-3)
    assert not [w for w in caught if "unstable" in str(w.message)]


def test_without_early_stopping_the_best_training_weights_are_kept():
    X = np.repeat(_moons()[:5], 40, axis=0)
    est, _ = _fit_recording(
        X, learning_rate_init=1.0, early_stopping=False, max_iter=30, batch_size=200
    )
    assert est.score(X) >= -min(est.loss_curve_) - 1.0


# ------------------------------------------------------------------------ memory


@pytest.mark.parametrize("method", ["score_samples", "transform", "sample"])
def test_inference_allocates_only_the_output_on_the_numpy_side(fitted, method):
    """tracemalloc sees numpy's allocations: beyond the returned array only per-chunk
    temporaries are allowed (torch's chunk activations are measured by bench_memory.py)."""
    import tracemalloc

    n = 300_000
    X = np.random.RandomState(0).randn(n, N_FEATURES)
    call = (
        (lambda: fitted.sample(n, random_state=0))
        if method == "sample"
        else (lambda: getattr(fitted, method)(X))
    )
    call()  # warm-up
    tracemalloc.start()
    try:
        out = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = peak - out.nbytes
    assert extra < 0.25 * out.nbytes, (peak, out.nbytes)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_fit_inside_a_no_grad_or_inference_context(context):
    """Fitted inside ``torch.inference_mode()``, the flow's tensors were inference tensors and
    the estimator could not score afterwards; now fit and partial_fit train as outside."""
    X = _moons()
    params = {"n_couplings": 2, "hidden_layer_sizes": (8,), "max_iter": 3, "random_state": 0,
              "device": "cpu"}
    ref = RealNVPDensity(**params).fit(X)
    ref_partial = RealNVPDensity(**params).partial_fit(X)
    with warnings.catch_warnings(), context():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = RealNVPDensity(**params).fit(X)
        partial = RealNVPDensity(**params).partial_fit(X)
    np.testing.assert_array_equal(est.score_samples(X), ref.score_samples(X))
    np.testing.assert_array_equal(est.sample(5, random_state=0), ref.sample(5, random_state=0))
    np.testing.assert_array_equal(partial.score_samples(X), ref_partial.score_samples(X))
