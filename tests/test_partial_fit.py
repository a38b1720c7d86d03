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

from sknvp import RealNVPDensity
from sknvp.transforms import Standardize

TINY = {
    "n_couplings": 4,
    "hidden_layer_sizes": (16, 16),
    "batch_size": 100,
    "learning_rate_init": 5e-3,
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models train fastest on one thread; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _banana(n, seed):
    """x1 ~ N(0, 1), x2 = x1**2 / 2 + N(0, 0.3**2): one coupling can represent it exactly."""
    rng = np.random.RandomState(seed)
    x1 = rng.normal(size=n)
    return np.c_[x1, 0.5 * x1**2 + 0.3 * rng.normal(size=n)]


def _banana_log_density(X):
    return norm.logpdf(X[:, 0]) + norm.logpdf(X[:, 1], 0.5 * X[:, 0] ** 2, 0.3)


@pytest.fixture(scope="module")
def stream():
    """800 banana rows in 4 chunks of 200, plus 2000 fresh held-out rows."""
    X = _banana(800, seed=0)
    return X, np.array_split(X, 4), _banana(2000, seed=1)


def _stream(est, chunks, n_passes=1):
    for _ in range(n_passes):
        for chunk in chunks:
            est.partial_fit(chunk)
    return est


def _state(est):
    return {k: v.clone() for k, v in est.module_.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _diagonal_gaussian_score(X, X_test):
    """Held-out log-likelihood of the untrained flow (a diagonal Gaussian fitted to ``X``)."""
    return float(norm.logpdf(X_test, X.mean(0), X.std(0)).sum(1).mean())


def test_partial_fit_chunks_reach_fit_log_likelihood(stream):
    # Same optimiser, step size, batch size and number of gradient steps: 12 passes over 4 chunks
    # of 200 rows vs fit with 12 epochs on the 800 rows. The true density is known, so the
    # held-out ceiling is exact (about -1.63 nats; the untrained flow, a diagonal Gaussian,
    # scores about -2.60). Measured over seeds 0-5: fit and partial_fit both end 0.015-0.04 nats
    # below the ceiling and differ by at most 0.02 nats. Tolerances: 0.05 nats between them
    # (2.5x the worst seen, and 5 % of the 0.97-nat range from Gaussian to ceiling) and 0.1 nats
    # to the ceiling for each, so a partial_fit that learned only part of the structure fails.
    X, chunks, X_test = stream
    n_passes = 12
    full = RealNVPDensity(
        max_iter=n_passes, learning_rate="constant", early_stopping=False, random_state=0, **TINY
    )
    with pytest.warns(Warning):  # ConvergenceWarning: max_iter reached (expected here)
        full.fit(X)
    streamed = _stream(RealNVPDensity(random_state=0, **TINY), chunks, n_passes)

    ceiling = _banana_log_density(X_test).mean()
    gaussian = _diagonal_gaussian_score(X, X_test)
    assert ceiling - gaussian > 0.8  # the data are far from Gaussian: the test is informative
    fit_score, stream_score = full.score(X_test), streamed.score(X_test)
    summary = f"fit {fit_score:.3f}, partial_fit {stream_score:.3f}, ceiling {ceiling:.3f}"
    assert abs(stream_score - fit_score) < 0.05, summary
    assert ceiling - 0.1 < stream_score < ceiling + 0.05, summary
    assert ceiling - 0.1 < fit_score < ceiling + 0.05, summary
    assert streamed.n_iter_ == len(streamed.loss_curve_) == n_passes * len(chunks)


def test_partial_fit_then_inference(stream):
    # After a single partial_fit the estimator is fitted: every inference method works.
    _, chunks, X_test = stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    log_density = est.score_samples(X_test)
    assert log_density.shape == (len(X_test),) and np.isfinite(log_density).all()
    assert est.score(X_test) == pytest.approx(log_density.mean())
    assert est.sample(7, random_state=0).shape == (7, 2)
    np.testing.assert_allclose(est.inverse_transform(est.transform(X_test)), X_test, atol=1e-8)
    assert est.n_features_in_ == 2 and est.n_iter_ == 1


def test_partial_fit_rejects_other_n_features(stream):
    # A later chunk with another number of columns is an error, as in sklearn's partial_fit.
    _, chunks, _ = stream
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


def test_partial_fit_keeps_optimizer_state(stream):
    # Adam's moments carry over between calls. Continuing a copy reproduces the original exactly
    # (control), while the same copy with its optimizer state dropped (a fresh Adam, as in a
    # first call) lands elsewhere. Uses the private ``_optimizer_state`` attribute.
    _, chunks, _ = stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    control, fresh = copy.deepcopy(est), copy.deepcopy(est)
    fresh._optimizer_state = None
    for e in (est, control, fresh):
        e.partial_fit(chunks[1])
    assert _same_state(_state(est), _state(control))
    assert not _same_state(_state(est), _state(fresh))
    steps = {float(s["step"]) for s in est._optimizer_state["state"].values()}
    assert steps == {4.0}  # 2 calls x 200 rows / batch_size 100: the step count accumulated


def test_partial_fit_reproducible_with_random_state(stream):
    # Same seed and chunks: identical flows; another seed: a different flow.
    _, chunks, X_test = stream
    a = _stream(RealNVPDensity(random_state=3, **TINY), chunks[:3])
    b = _stream(RealNVPDensity(random_state=3, **TINY), chunks[:3])
    c = _stream(RealNVPDensity(random_state=4, **TINY), chunks[:3])
    assert _same_state(_state(a), _state(b))
    np.testing.assert_array_equal(a.score_samples(X_test), b.score_samples(X_test))
    assert a.loss_curve_ == b.loss_curve_
    assert not np.allclose(a.score_samples(X_test), c.score_samples(X_test))


def test_partial_fit_pickle_between_calls_is_seamless(stream):
    # Pickling after two chunks and continuing gives bit-identical results to not pickling.
    _, chunks, X_test = stream
    est = _stream(RealNVPDensity(random_state=0, **TINY), chunks[:2])
    restored = pickle.loads(pickle.dumps(est))
    for e in (est, restored):
        _stream(e, chunks[2:])
    assert _same_state(_state(est), _state(restored))
    assert est.loss_curve_ == restored.loss_curve_ and est.n_iter_ == restored.n_iter_ == 4
    np.testing.assert_array_equal(est.score_samples(X_test), restored.score_samples(X_test))


def test_partial_fit_continues_after_fit(stream):
    # fit on a sample, then stream more chunks (as MLPClassifier allows).
    _, chunks, X_test = stream
    est = RealNVPDensity(max_iter=2, early_stopping=False, random_state=0, **TINY)
    with pytest.warns(Warning):
        est.fit(chunks[0])
    est.partial_fit(chunks[1])
    assert est.n_iter_ == 3 and np.isfinite(est.score(X_test))


def test_partial_fit_rejects_all_zero_weights(stream):
    # A chunk whose weights are all zero carries no information; fit raises ValueError for it.
    _, chunks, _ = stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    zeros = np.zeros(len(chunks[1]))
    with pytest.raises(ValueError, match="non-zero|positive sum"):
        est.partial_fit(chunks[1], sample_weight=zeros)


def test_pickling_leaves_the_estimator_unchanged(stream):
    # Pickling between partial_fit calls must not change the estimator being pickled.
    _, chunks, _ = stream
    est = RealNVPDensity(random_state=0, **TINY).partial_fit(chunks[0])
    pickle.dumps(est)
    assert isinstance(est.device_, torch.device), f"device_ became {est.device_!r}"


def test_every_partial_fit_call_keeps_its_update(stream):
    # One call = one pass whose Adam steps are kept: the weights must change on every call
    # (not be rolled back to the chunk's start, which would also leave them out of step with
    # the optimizer state, which did advance). 12 passes over 4 chunks.
    _, chunks, _ = stream
    est = RealNVPDensity(random_state=0, **TINY)
    previous = None
    unchanged = []
    for _ in range(12):
        for chunk in chunks:
            est.partial_fit(chunk)
            current = _state(est)
            if previous is not None and _same_state(previous, current):
                unchanged.append(est.n_iter_)
            previous = current
    assert not unchanged, f"calls {unchanged} of 48 left the weights unchanged"


def test_partial_fit_applies_input_noise_reproducibly():
    # The out-of-core path trains through the same minibatch hook: noise changes the passes,
    # and the same random_state gives the same model.
    X = _banana(400, 0)
    fits = []
    for noise in (0.1, 0.1, 0.0):
        est = RealNVPDensity(**{**TINY, "input_noise": noise, "random_state": 0})
        est.partial_fit(X[:200]).partial_fit(X[200:])
        fits.append(est.score_samples(X))
    np.testing.assert_array_equal(fits[0], fits[1])
    assert not np.allclose(fits[0], fits[2])
