"""Fuzzing RealNVPDensity with arbitrary arrays.

Whatever array is thrown at ``fit`` or ``score_samples`` (any shape, any dtype, huge, tiny or
non-finite values), the estimator either raises one of the documented exception types
(``ValueError``, ``TypeError``; sklearn's ``InvalidParameterError`` is both) with a message,
or returns finite output of the right shape, and a fitted model never holds non-finite weights.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.exceptions import ConvergenceWarning

from sknvp import RealNVPDensity

DOCUMENTED = (ValueError, TypeError)
N_FEATURES = 3
NUMERIC = [
    np.float64,
    np.float32,
    np.float16,
    np.int64,
    np.int32,
    np.int8,
    np.uint8,
    np.bool_,
    np.complex128,
]
# SKNVP_FUZZ_EXAMPLES=500 runs a deeper, randomised search (CI: 30 fixed examples per test).
_DEEP = int(os.environ.get("SKNVP_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    deadline=None,
    max_examples=_DEEP or 30,
    derandomize=not _DEEP,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.fixture(autouse=True)
def _one_thread_quiet():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(n)


def _elements(dtype):
    """The dtype's full range (nan, inf, extremes, subnormals) mixed with ordinary values."""
    full = hnp.from_dtype(np.dtype(dtype))
    kind = np.dtype(dtype).kind
    if kind == "f":
        width = 8 * np.dtype(dtype).itemsize
        return st.one_of(
            full,
            st.floats(-10, 10, width=width),
            st.sampled_from(
                [1e-300, -1e-300, 1e300, -1e300, 5e-324, 1.7e308] if width == 64 else [0.0, 1.0]
            ),
        )
    return full


@st.composite
def arrays(draw, n_features=None, table=False):
    """Arbitrary array-likes: 0-3 dims, numeric / bool / complex / object dtypes; ``table``
    draws 2-D arrays of 2-12 rows (mostly valid training data), ``n_features`` fixes columns."""
    if n_features is not None:
        shape = (draw(st.integers(0, 8)), n_features)
    elif table:
        shape = (draw(st.integers(2, 12)), draw(st.integers(1, 4)))
    else:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    if draw(st.integers(0, 9)) == 0:
        objects = st.one_of(st.none(), st.text(max_size=2), st.floats(), st.integers(-5, 5))
        return draw(hnp.arrays(object, shape, elements=objects))
    dtype = draw(st.sampled_from(NUMERIC))
    X = draw(hnp.arrays(dtype, shape, elements=_elements(dtype)))
    return X.tolist() if draw(st.integers(0, 9)) == 0 else X


def _finite_state(est):
    return all(
        bool(torch.isfinite(t).all())
        for t in est.module_.state_dict().values()
        if t.is_floating_point()
    )


@FUZZ
@given(
    X=st.one_of(arrays(), arrays(table=True)),
    dtype=st.sampled_from(["float32", "float64"]),
    early_stopping=st.booleans(),
)
def test_fit_fuzz(X, dtype, early_stopping):
    est = RealNVPDensity(
        n_couplings=2,
        hidden_layer_sizes=(4,),
        max_iter=2,
        batch_size=4,
        early_stopping=early_stopping,
        dtype=dtype,
        random_state=0,
        device="cpu",
    )
    try:
        est.fit(X)
    except DOCUMENTED as exc:
        event(f"fit raised {type(exc).__name__}")
        assert str(exc)
        assert not hasattr(est, "module_") and not hasattr(est, "n_features_in_")
        return
    event("fit succeeded")
    Xa = np.asarray(X, dtype=np.float64)
    assert _finite_state(est)
    scores = est.score_samples(Xa)
    assert scores.shape == (len(Xa),) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores))
    sample = est.sample(5, random_state=0)
    assert sample.shape == (5, Xa.shape[1]) and np.all(np.isfinite(sample))


@pytest.fixture(scope="module")
def fitted():
    X = np.random.RandomState(0).randn(60, N_FEATURES) * [1.0, 10.0, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return RealNVPDensity(
            n_couplings=2,
            hidden_layer_sizes=(8,),
            max_iter=3,
            batch_size=16,
            random_state=0,
            device="cpu",
        ).fit(X)


@FUZZ
@given(X=st.one_of(arrays(), arrays(n_features=N_FEATURES)))
def test_score_samples_fuzz(fitted, X):
    state = {k: v.clone() for k, v in fitted.module_.state_dict().items()}
    try:
        scores = fitted.score_samples(X)
    except DOCUMENTED as exc:
        event(f"score_samples raised {type(exc).__name__}")
        assert str(exc)
    else:
        event("score_samples succeeded")
        assert scores.shape == (len(X),) and scores.dtype == np.float64
        assert np.all(np.isfinite(scores))
    after = fitted.module_.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
