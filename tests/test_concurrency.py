"""Concurrent use of one fitted RealNVPDensity, and parallel model selection."""

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from joblib import parallel_backend
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from sknvp import RealNVPDensity

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
TINY = {
    "n_couplings": 2,
    "hidden_layer_sizes": (8,),
    "max_iter": 3,
    "batch_size": 16,
    "random_state": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_quiet():
    """One intra-op torch thread per call (the concurrency under test is ours, not OpenMP's)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "batch_norm"])
def fitted(request):
    X = np.random.RandomState(0).randn(200, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return RealNVPDensity(**{**TINY, "batch_norm": request.param}).fit(X)


@pytest.fixture(scope="module")
def queries():
    """16 query sets of different sizes (some above the 65536-row inference chunk)."""
    rng = np.random.RandomState(1)
    sizes = [1, 7, 100, 1000, 70000, 3, 500, 2, 9999, 64, 65537, 10, 300, 5, 42, 1234]
    return [rng.randn(n, 3) * 2 for n in sizes]


def _in_threads(fn, items, n_threads=8):
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        return list(pool.map(fn, items))


def test_score_samples_from_many_threads_equals_serial(fitted, queries):
    serial = [fitted.score_samples(X) for X in queries]
    state = {k: v.clone() for k, v in fitted.module_.state_dict().items()}
    for _ in range(2):
        parallel = _in_threads(fitted.score_samples, queries)
        for a, b in zip(parallel, serial, strict=True):
            np.testing.assert_array_equal(a, b)
    after = fitted.module_.state_dict()  # batch-norm running statistics included
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_same_array_from_many_threads(fitted, queries):
    X = queries[3]
    ref = fitted.score_samples(X)
    for out in _in_threads(lambda _: fitted.score_samples(X), range(32)):
        np.testing.assert_array_equal(out, ref)


def test_transform_inverse_and_sample_from_many_threads(fitted, queries):
    Xs = queries[:8]
    z_serial = [fitted.transform(X) for X in Xs]
    x_serial = [fitted.inverse_transform(Z) for Z in z_serial]
    s_serial = [fitted.sample(500, random_state=seed) for seed in range(8)]
    z_par = _in_threads(fitted.transform, Xs)
    x_par = _in_threads(fitted.inverse_transform, z_serial)
    s_par = _in_threads(lambda seed: fitted.sample(500, random_state=seed), range(8))
    for got, want in zip(z_par + x_par + s_par, z_serial + x_serial + s_serial, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def grid_data():
    from sklearn.datasets import make_moons

    return make_moons(120, noise=0.05, random_state=0)[0]


def _grid(n_jobs):
    return GridSearchCV(
        RealNVPDensity(**{**TINY, "max_iter": 2}),
        {"n_couplings": [1, 2]},
        cv=2,
        n_jobs=n_jobs,
    )


@pytest.fixture(scope="module")
def serial_grid(grid_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _grid(1).fit(grid_data)


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_grid_search_n_jobs_2(grid_data, serial_grid, backend):
    with parallel_backend(backend, n_jobs=2):
        search = _grid(2).fit(grid_data)
    np.testing.assert_allclose(
        search.cv_results_["mean_test_score"],
        serial_grid.cv_results_["mean_test_score"],
        rtol=1e-10,
    )
    assert search.best_params_ == serial_grid.best_params_
    np.testing.assert_allclose(
        search.best_estimator_.score_samples(grid_data),
        serial_grid.best_estimator_.score_samples(grid_data),
        rtol=1e-10,
    )
