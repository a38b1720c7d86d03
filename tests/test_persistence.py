"""Persistence of RealNVPDensity: pickle, joblib, device changes, interrupted fits."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sknvp import RealNVPDensity

TINY = dict(n_couplings=2, hidden_layer_sizes=(8,), max_iter=3, batch_size=16,
            random_state=0, device="cpu")


@pytest.fixture(autouse=True)
def _one_thread_quiet():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return np.random.RandomState(0).randn(80, 2)


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
    return copy.deepcopy(_fitted_once)


def test_pickling_does_not_mutate_the_live_model(fitted, data):
    """__getstate__ must work on a copy of __dict__, not on the estimator itself."""
    before = fitted.score_samples(data)
    module = fitted.module_
    for _ in range(3):  # pickling twice used to fail: device_ had become a str
        pickle.dumps(fitted)
    assert isinstance(fitted.device_, torch.device)
    assert fitted.module_ is module
    np.testing.assert_array_equal(fitted.score_samples(data), before)


def test_deepcopy_twice(fitted, data):
    twice = copy.deepcopy(copy.deepcopy(fitted))
    assert isinstance(twice.device_, torch.device)
    np.testing.assert_array_equal(twice.score_samples(data), fitted.score_samples(data))
