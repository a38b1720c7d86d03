"""Out-of-core training with ``RealNVPDensity.partial_fit`` (issue 6).

The estimators here are tiny (4 couplings, 16-unit conditioners) and run with one torch thread:
with two intra-op threads on a loaded 2-core machine a small flow trains several times slower.
"""

import copy
import pickle
import re

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.datasets import make_moons

from sknvp import RealNVPDensity
from sknvp.transforms import Standardize

TINY = dict(n_couplings=4, hidden_layer_sizes=(16, 16), batch_size=100, learning_rate_init=5e-3)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models train fastest on one thread; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def moons_stream():
    """800 training rows in 4 chunks of 200, plus 1000 fresh held-out rows."""
    X, _ = make_moons(800, noise=0.05, random_state=0)
    X = X[np.random.RandomState(0).permutation(len(X))]
    X_test, _ = make_moons(1000, noise=0.05, random_state=1)
    return X, np.array_split(X, 4), X_test


def _stream(est, chunks, n_passes=1):
    for _ in range(n_passes):
        for chunk in chunks:
            est.partial_fit(chunk)
    return est


def _state(est):
    return {k: v.clone() for k, v in est.module_.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _copy(est):
    """Deep copy that undoes the side effect of ``__getstate__`` on the original's ``device_``
    (see ``test_pickling_leaves_the_estimator_unchanged``)."""
    device = est.device_
    twin = copy.deepcopy(est)
    est.device_ = device
    return twin


def _diagonal_gaussian_score(X, X_test):
    """Held-out log-likelihood of the untrained flow (a diagonal Gaussian fitted to ``X``)."""
    return float(norm.logpdf(X_test, X.mean(0), X.std(0)).sum(1).mean())


def test_partial_fit_chunks_reach_fit_log_likelihood(moons_stream):
    # Same optimiser, step size, batch size and number of gradient steps: 12 passes over 4 chunks
    # of 200 rows vs fit with 12 epochs on the 800 rows. Tolerance: the held-out gap must be
    # below a quarter of what fit gains over the untrained flow (a diagonal Gaussian), i.e. both
    # learned most of the same non-Gaussian structure. Across seeds 0-2 at this budget fit's own
    # held-out score varies by about 0.3 nats and |partial_fit - fit| was 0.07-0.12 nats, while
    # the gain is 0.7-1.0 nats, so the bound (about 0.2 nats) is neither loose nor flaky.
    X, chunks, X_test = moons_stream
    n_passes = 12
    full = RealNVPDensity(
        max_iter=n_passes, learning_rate="constant", early_stopping=False, random_state=0, **TINY
    )
    with pytest.warns(Warning):  # ConvergenceWarning: max_iter reached (expected here)
        full.fit(X)
    streamed = _stream(RealNVPDensity(random_state=0, **TINY), chunks, n_passes)

    baseline = _diagonal_gaussian_score(X, X_test)
    gain = full.score(X_test) - baseline
    assert gain > 0.4, f"fit barely beat a Gaussian ({gain:.3f} nats): test is not informative"
    gap = abs(streamed.score(X_test) - full.score(X_test))
    assert gap < 0.25 * gain, f"partial_fit {streamed.score(X_test):.3f} vs fit " \
        f"{full.score(X_test):.3f} (Gaussian {baseline:.3f})"
    assert streamed.n_iter_ == n_passes * len(chunks)
    assert len(streamed.loss_curve_) == n_passes * len(chunks)


def test_partial_fit_then_inference(moons_stream):
    # After a single partial_fit the estimator is fitted: every inference method works.
    X, chunks, X_test = moons_stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    log_density = est.score_samples(X_test)
    assert log_density.shape == (len(X_test),) and np.isfinite(log_density).all()
    assert est.score(X_test) == pytest.approx(log_density.mean())
    assert est.sample(7, random_state=0).shape == (7, 2)
    np.testing.assert_allclose(est.inverse_transform(est.transform(X_test)), X_test, atol=1e-8)
    assert est.n_features_in_ == 2 and est.n_iter_ == 1


def test_partial_fit_rejects_other_n_features(moons_stream):
    # A later chunk with another number of columns is an error, as in sklearn's partial_fit.
    _, chunks, _ = moons_stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    wider = np.hstack([chunks[1], chunks[1][:, :1]])
    msg = "X has 3 features, but RealNVPDensity is expecting 2 features as input."
    with pytest.raises(ValueError, match=re.escape(msg)):
        est.partial_fit(wider)
    assert est.n_iter_ == 1  # the failed call changed nothing


def test_partial_fit_standardisation_fixed_by_first_chunk():
    # The first chunk sets the standardisation; a later, shifted chunk does not move it.
    rng = np.random.RandomState(0)
    first = rng.normal(size=(200, 2))
    later = rng.normal(loc=5.0, scale=3.0, size=(200, 2))
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(first).partial_fit(later)
    (standardize,) = [m for m in est.module_.modules() if isinstance(m, Standardize)]
    # rtol 1e-6: the buffers pass through float32 training (dtype="float32") and back.
    np.testing.assert_allclose(standardize.loc.numpy(), first.mean(0), rtol=1e-6)
    np.testing.assert_allclose(standardize.scale.numpy(), first.std(0), rtol=1e-6)


def test_partial_fit_keeps_optimizer_state(moons_stream):
    # Adam's moments carry over between calls. Continuing a copy reproduces the original exactly
    # (control), while the same copy with its optimizer state dropped (a fresh Adam, as in a
    # first call) lands elsewhere. Uses the private ``_optimizer_state`` attribute.
    _, chunks, _ = moons_stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    control, fresh = _copy(est), _copy(est)
    fresh._optimizer_state = None
    for e in (est, control, fresh):
        e.partial_fit(chunks[1])
    assert _same_state(_state(est), _state(control))
    assert not _same_state(_state(est), _state(fresh))
    steps = {float(s["step"]) for s in est._optimizer_state["state"].values()}
    assert steps == {4.0}  # 2 calls x 200 rows / batch_size 100: the step count accumulated


def test_partial_fit_reproducible_with_random_state(moons_stream):
    # Same seed and chunks: identical flows; another seed: a different flow.
    _, chunks, X_test = moons_stream
    a = _stream(RealNVPDensity(random_state=3, **TINY), chunks[:3])
    b = _stream(RealNVPDensity(random_state=3, **TINY), chunks[:3])
    c = _stream(RealNVPDensity(random_state=4, **TINY), chunks[:3])
    assert _same_state(_state(a), _state(b))
    np.testing.assert_array_equal(a.score_samples(X_test), b.score_samples(X_test))
    assert a.loss_curve_ == b.loss_curve_
    assert not np.allclose(a.score_samples(X_test), c.score_samples(X_test))


def test_partial_fit_pickle_between_calls_is_seamless(moons_stream):
    # Pickling after two chunks and continuing gives bit-identical results to not pickling.
    _, chunks, X_test = moons_stream
    est = _stream(RealNVPDensity(random_state=0, **TINY), chunks[:2])
    restored = pickle.loads(pickle.dumps(est))
    for e in (est, restored):
        _stream(e, chunks[2:])
    assert _same_state(_state(est), _state(restored))
    assert est.loss_curve_ == restored.loss_curve_ and est.n_iter_ == restored.n_iter_ == 4
    np.testing.assert_array_equal(est.score_samples(X_test), restored.score_samples(X_test))


def test_partial_fit_continues_after_fit(moons_stream):
    # fit on a sample, then stream more chunks (as MLPClassifier allows).
    X, chunks, X_test = moons_stream
    est = RealNVPDensity(max_iter=2, early_stopping=False, random_state=0, **TINY)
    with pytest.warns(Warning):
        est.fit(chunks[0])
    est.partial_fit(chunks[1])
    assert est.n_iter_ == 3 and np.isfinite(est.score(X_test))


@pytest.mark.xfail(
    raises=AssertionError, strict=True,
    reason="partial_fit does not check that sample_weight has a positive sum (fit does)",
)
def test_partial_fit_rejects_all_zero_weights(moons_stream):
    # A chunk whose weights are all zero carries no information; fit raises ValueError for it.
    _, chunks, _ = moons_stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    zeros = np.zeros(len(chunks[1]))
    try:
        est.partial_fit(chunks[1], sample_weight=zeros)
    except ValueError as exc:
        assert "positive sum" in str(exc)
    else:
        raise AssertionError("an all-zero sample_weight chunk was accepted (trained unweighted)")


@pytest.mark.xfail(
    raises=AssertionError, strict=True,
    reason="__getstate__ writes str(device_) into the live __dict__ (object.__getstate__ returns "
    "it uncopied on Python >= 3.11), so pickling turns the original's device_ into a str",
)
def test_pickling_leaves_the_estimator_unchanged(moons_stream):
    # Pickling between partial_fit calls must not change the estimator being pickled.
    _, chunks, _ = moons_stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    pickle.dumps(est)
    assert isinstance(est.device_, torch.device), f"device_ became {est.device_!r}"
