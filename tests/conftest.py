"""Shared test configuration: hypothesis profiles and small helpers."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
# CI (the CI variable set, as .ci/run's callers and most CI services do) draws the same
# examples on every run, so a gate's verdict does not depend on the draw; local runs explore.
settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)


@pytest.fixture
def moons():
    """Two moons (noise 0.05): 400 training rows and 400 fresh test rows."""
    from sklearn.datasets import make_moons

    X, _ = make_moons(400, noise=0.05, random_state=0)
    X_test, _ = make_moons(400, noise=0.05, random_state=1)
    return X, X_test


@pytest.fixture
def rng():
    return np.random.RandomState(0)
