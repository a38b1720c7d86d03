"""Parallel and distributed hyper-parameter search through joblib backends (issue 6).

``GridSearchCV(n_jobs=...)`` hands its fits to joblib; the backend decides where they run: loky
worker processes, threads, or the workers of a ``dask.distributed`` cluster. Each fit is seeded
by ``random_state``, so every backend must reproduce the serial search.
"""

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import joblib
import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from sknvp import RealNVPDensity

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# 4 features, so "alternating" (halves) and "checkerboard" (even/odd) are different masks.
GRID = {"n_couplings": [2, 4], "mask": ["alternating", "checkerboard"]}
SEARCH_TIMEOUT_S = 300


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Match the workers (dask's nanny and loky both set OMP_NUM_THREADS=1 here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def X():
    """A banana in the first two features and a correlated Gaussian pair in the last two."""
    rng = np.random.RandomState(0)
    x1 = rng.normal(size=300)
    pair = rng.normal(size=(300, 2)) @ np.array([[1.0, 0.8], [0.0, 0.6]])
    return np.c_[x1, 0.5 * x1**2 + 0.3 * rng.normal(size=300), pair]


def _search(n_jobs):
    est = RealNVPDensity(
        hidden_layer_sizes=(8,), max_iter=4, batch_size=50, early_stopping=False, random_state=0
    )
    return GridSearchCV(est, GRID, cv=2, n_jobs=n_jobs)


def _fit_under(backend, search, X):
    """Fit inside ``joblib.parallel_backend(backend)``, giving up after SEARCH_TIMEOUT_S."""

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            with joblib.parallel_backend(backend):
                return search.fit(X)

    with ThreadPoolExecutor(1) as pool:  # joblib's backend choice is per thread: set it there
        return pool.submit(run).result(timeout=SEARCH_TIMEOUT_S)


@pytest.fixture(scope="module")
def serial_search(X):
    return _search(n_jobs=1).fit(X)


def _assert_same_search(search, reference):
    for key in ("mean_test_score", "split0_test_score", "split1_test_score"):
        np.testing.assert_allclose(
            search.cv_results_[key], reference.cv_results_[key], rtol=1e-12, atol=0
        )
    assert search.cv_results_["params"] == reference.cv_results_["params"]
    assert search.best_params_ == reference.best_params_


@pytest.fixture(scope="module")
def dask_client():
    """A real two-process cluster on loopback, always shut down afterwards."""
    distributed = pytest.importorskip(
        "dask.distributed",
        reason="dask.distributed is not installed (pip install 'sknvp[distributed]')",
    )
    cluster = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster, timeout="60s")
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def test_grid_search_on_dask_cluster_matches_serial(dask_client, X, serial_search):
    # The search runs on the cluster's worker processes and gives the serial search's scores.
    from dask.distributed import get_task_stream

    with get_task_stream(dask_client) as stream:
        search = _fit_under("dask", _search(n_jobs=-1), X)
    workers = {task["worker"] for task in stream.data}
    assert workers and workers <= set(dask_client.scheduler_info()["workers"])
    _assert_same_search(search, serial_search)
    assert search.best_estimator_.score(X) == pytest.approx(serial_search.best_estimator_.score(X))


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_grid_search_local_backends(backend, X, serial_search):
    # n_jobs=2 on worker processes (loky) or on threads reproduces the serial search exactly.
    search = _fit_under(backend, _search(n_jobs=2), X)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    _assert_same_search(search, serial_search)


def test_seeded_fits_in_threads_are_reproducible(X):
    # 16 seeded one-epoch fits, four at a time in threads, must equal the same fits run serially.
    def fit(seed):
        est = RealNVPDensity(
            n_couplings=8,
            hidden_layer_sizes=(32, 32),
            max_iter=1,
            batch_size=100,
            early_stopping=False,
            random_state=seed,
        )
        return est.fit(X[:100]).score_samples(X)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        serial = [fit(seed) for seed in range(16)]
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(fit, range(16)))
    mismatched = [s for s in range(16) if not np.array_equal(serial[s], threaded[s])]
    assert not mismatched, f"seeds {mismatched} gave different fits in threads"
