"""Persistence of RealNVPDensity: pickle, joblib, device changes, interrupted fits."""

import copy
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

import sknvp._training as training_module
from sknvp import RealNVPDensity

TINY = {
    "n_couplings": 2,
    "hidden_layer_sizes": (8,),
    "max_iter": 3,
    "batch_size": 16,
    "random_state": 0,
    "device": "cpu",
}
REPO = Path(__file__).resolve().parents[1]


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
    return np.random.RandomState(0).randn(80, 2) * [1.0, 3.0] + [0.0, 5.0]


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


def assert_same_model(a, b, X):
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.sample(20, random_state=3), b.sample(20, random_state=3))
    assert a.get_params() == b.get_params()
    for name in (
        "n_features_in_",
        "n_iter_",
        "loss_curve_",
        "validation_scores_",
        "best_validation_score_",
        "converged_",
        "lr_drops_",
        "device_",
    ):
        assert getattr(a, name) == getattr(b, name), name
    sa, sb = a.module_.state_dict(), b.module_.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------- round trips


def test_pickling_does_not_mutate_the_live_model(fitted, data):
    """__getstate__ must work on a copy of __dict__, not on the estimator itself."""
    before = fitted.score_samples(data)
    module = fitted.module_
    for _ in range(3):  # pickling twice used to fail: device_ had become a str
        pickle.dumps(fitted)
    assert isinstance(fitted.device_, torch.device)
    assert fitted.module_ is module
    np.testing.assert_array_equal(fitted.score_samples(data), before)


def test_a_pickle_from_before_lr_drops_loads_with_none_recorded(fitted, data):
    state = fitted.__getstate__()
    del state["lr_drops_"]  # what a model pickled by sknvp before the plateau rule holds
    old = RealNVPDensity.__new__(RealNVPDensity)
    old.__setstate__(state)
    assert old.lr_drops_ == []
    np.testing.assert_array_equal(old.score_samples(data), fitted.score_samples(data))


def test_deepcopy_twice(fitted, data):
    twice = copy.deepcopy(copy.deepcopy(fitted))
    assert isinstance(twice.device_, torch.device)
    assert_same_model(twice, fitted, data)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(fitted, data, protocol):
    loaded = pickle.loads(pickle.dumps(fitted, protocol=protocol))
    assert isinstance(loaded.device_, torch.device) and loaded.device_.type == "cpu"
    assert_same_model(loaded, fitted, data)


@pytest.mark.parametrize("compress", [0, 3])
def test_joblib_round_trip(fitted, data, tmp_path, compress):
    path = tmp_path / "model.joblib"
    joblib.dump(fitted, path, compress=compress)
    assert_same_model(joblib.load(path), fitted, data)


def test_round_trip_of_unfitted_and_dataframe_fitted(data):
    import pandas as pd

    est = RealNVPDensity(**TINY)
    assert pickle.loads(pickle.dumps(est)).get_params() == est.get_params()
    df = pd.DataFrame(data, columns=["a", "b"])
    fitted = RealNVPDensity(**TINY).fit(df)
    loaded = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(loaded.feature_names_in_, ["a", "b"])
    np.testing.assert_array_equal(loaded.score_samples(df), fitted.score_samples(df))


def test_warm_start_continues_identically_after_a_round_trip(fitted, data):
    """The optimizer state travels too: resuming from a copy equals resuming the original."""
    loaded = pickle.loads(pickle.dumps(fitted))
    for est in (fitted, loaded):
        est.set_params(warm_start=True, max_iter=2).fit(data)
    assert_same_model(loaded, fitted, data)


SUBPROCESS = """
import pickle, sys
assert "torch" not in sys.modules and "sknvp" not in sys.modules
import numpy as np
with open(sys.argv[1], "rb") as f:
    est = pickle.load(f)
X = np.load(sys.argv[2])
np.save(sys.argv[3], est.score_samples(X))
np.save(sys.argv[4], est.sample(10, random_state=5))
print(type(est).__name__, est.device_)
"""


def test_loads_in_a_fresh_process_that_never_imported_torch(fitted, data, tmp_path):
    model, X = tmp_path / "m.pkl", tmp_path / "X.npy"
    scores, samples = tmp_path / "s.npy", tmp_path / "z.npy"
    model.write_bytes(pickle.dumps(fitted))
    np.save(X, data)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, str(model), str(X), str(scores), str(samples)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["RealNVPDensity", "cpu"]
    np.testing.assert_array_equal(np.load(scores), fitted.score_samples(data))
    np.testing.assert_array_equal(np.load(samples), fitted.sample(10, random_state=5))


# -------------------------------------------------------------------- device change


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_model_fitted_on_an_accelerator_pickles_to_cpu(fitted, data, device):
    """Simulated: device_ says CUDA, as after fit(device="cuda"). The pickle must hold CPU
    tensors only, leave the live model alone, and load on a CPU-only machine on the CPU."""
    if torch.cuda.is_available() and device == "cuda":
        pytest.skip("CUDA present: the real path is tested by test_real_gpu_round_trip")
    fitted.device_ = torch.device(device)
    module = fitted.module_
    state = fitted.__getstate__()
    assert state["device_"] == device
    assert state["module_"] is not module
    tensors = list(_tensors(state["module_"].state_dict())) + list(
        _tensors(state["_optimizer_state"])
    )
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert fitted.device_ == torch.device(device) and fitted.module_ is module
    loaded = pickle.loads(pickle.dumps(fitted))
    assert loaded.device_ == torch.device("cpu")
    assert next(loaded.module_.parameters()).device.type == "cpu"
    fitted.device_ = torch.device("cpu")
    assert_same_model(loaded, fitted, data)


def test_unavailable_device_on_load_falls_back_to_cpu(fitted, data):
    fitted.device_ = torch.device("mps")
    loaded = pickle.loads(pickle.dumps(fitted))
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert loaded.device_ == torch.device("cpu")
    fitted.device_ = torch.device("cpu")
    np.testing.assert_array_equal(loaded.score_samples(data), fitted.score_samples(data))


GPU_SUBPROCESS = """
import pickle, sys
import numpy as np
with open(sys.argv[1], "rb") as f:
    est = pickle.load(f)
np.save(sys.argv[3], est.score_samples(np.load(sys.argv[2])))
print(est.device_)
"""


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device: fit on GPU, load on a CPU-only process",
)
def test_real_gpu_round_trip(data, tmp_path):
    est = RealNVPDensity(**{**TINY, "device": "cuda"}).fit(data)
    assert est.device_.type == "cuda"
    assert next(est.module_.parameters()).device.type == "cuda"
    ref = est.score_samples(data)
    blob = pickle.dumps(est)
    assert est.device_.type == "cuda"  # the live model stays where it is
    same = pickle.loads(blob)  # loads back onto the GPU where one is present
    assert same.device_.type == "cuda"
    np.testing.assert_array_equal(same.score_samples(data), ref)
    model, X, out = tmp_path / "m.pkl", tmp_path / "X.npy", tmp_path / "s.npy"
    model.write_bytes(blob)
    np.save(X, data)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-c", GPU_SUBPROCESS, str(model), str(X), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "cpu"
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-10, atol=1e-10)


# -------------------------------------------------------------------- interruption


def _interrupting_train_epoch(monkeypatch, at_epoch, at_batch=None):
    """Raise KeyboardInterrupt at the start of epoch ``at_epoch`` (0-based), or inside it just
    before batch ``at_batch`` (after the previous batches' optimizer steps)."""
    original = training_module._train_epoch
    calls = {"n": 0}

    def patched(module, optimizer, x, w, batch_size, generator, transform_batch, *rest):
        epoch = calls["n"]
        calls["n"] += 1
        if epoch != at_epoch:
            return original(
                module, optimizer, x, w, batch_size, generator, transform_batch, *rest
            )
        if at_batch is None:
            raise KeyboardInterrupt
        seen = {"n": 0}

        def interrupt_later(xb):
            seen["n"] += 1
            if seen["n"] > at_batch:
                raise KeyboardInterrupt
            return xb if transform_batch is None else transform_batch(xb)

        return original(module, optimizer, x, w, batch_size, generator, interrupt_later, *rest)

    monkeypatch.setattr(training_module, "_train_epoch", patched)
    return calls


def _fit_warnings(est, X):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X)
    return [w for w in caught]


@pytest.mark.parametrize("at_batch", [None, 2], ids=["between-epochs", "mid-epoch"])
def test_keyboard_interrupt_keeps_the_best_weights_so_far(monkeypatch, at_batch):
    """Interrupting epoch 3 gives exactly the model of an uninterrupted 2-epoch fit (with a
    constant learning rate the first two epochs are the same; both keep the best of them)."""
    from sklearn.datasets import make_moons

    data = make_moons(200, noise=0.05, random_state=0)[0]  # not Gaussian: training improves
    # on the standard normal base (a mixture start need not be beaten by a standard error)
    params = {
        **TINY, "max_iter": 10, "learning_rate": "constant", "learning_rate_init": 1e-2,
        "base": "normal",
    }
    reference = RealNVPDensity(**{**params, "max_iter": 2}).fit(data)
    _interrupting_train_epoch(monkeypatch, at_epoch=2, at_batch=at_batch)
    est = RealNVPDensity(**params)
    caught = _fit_warnings(est, data)
    assert any("interrupted after 2 epoch" in str(w.message) for w in caught)
    assert est.n_iter_ == 2 and len(est.loss_curve_) == 2 and len(est.validation_scores_) == 2
    assert est.converged_ is False
    assert est.best_validation_score_ == max(est.validation_scores_)  # training did improve
    np.testing.assert_array_equal(est.score_samples(data), reference.score_samples(data))
    assert_same_model(pickle.loads(pickle.dumps(est)), est, data)


@pytest.mark.parametrize("base", ["normal", "mixture"])
def test_keyboard_interrupt_in_first_epoch_keeps_initial_flow(data, monkeypatch, base):
    """Nothing trained yet: the flow is its initial state (identity couplings after the
    standardisation): a Gaussian with the data's mean and standard deviation per feature on a
    normal base, the base's Gaussian mixture carried into data units on a mixture base."""
    _interrupting_train_epoch(monkeypatch, at_epoch=0, at_batch=1)
    est = RealNVPDensity(**{**TINY, "early_stopping": False, "dtype": "float64", "base": base})
    caught = _fit_warnings(est, data)
    assert any("interrupted after 0 epoch" in str(w.message) for w in caught)
    assert est.n_iter_ == 0 and est.loss_curve_ == [] and est.best_validation_score_ is None
    if base == "normal":
        expected = norm.logpdf(data, data.mean(0), data.std(0)).sum(1)
    else:
        mix = est.module_.base
        prec = mix.precisions_cholesky().detach().numpy()
        loc, scale = data.mean(0), data.std(0)
        parts = [
            np.log(w) + multivariate_normal(
                loc + scale * m, np.outer(scale, scale) * np.linalg.inv(p @ p.T)
            ).logpdf(data)
            for w, m, p in zip(
                torch.softmax(mix.logits, 0).detach().numpy(), mix.means.detach().numpy(),
                prec, strict=True,
            )
        ]
        expected = logsumexp(np.column_stack(parts), axis=1)
    np.testing.assert_allclose(est.score_samples(data), expected, rtol=1e-10)


def test_interrupted_refit_replaces_the_model_consistently(fitted, data, monkeypatch):
    other = np.random.RandomState(9).randn(60, 3)
    _interrupting_train_epoch(monkeypatch, at_epoch=1)
    _fit_warnings(fitted, other)
    assert fitted.n_features_in_ == 3 and fitted.n_iter_ == 1
    assert fitted.module_.transform[0].loc.shape == (3,)
    assert np.all(np.isfinite(fitted.score_samples(other)))


def test_keyboard_interrupt_before_training_leaves_fitted_model_untouched(
    fitted, data, monkeypatch
):
    """An interrupt outside the training loop propagates, and the old model stays whole."""
    before = fitted.score_samples(data)
    module = fitted.module_

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(RealNVPDensity, "_build_module", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fitted.fit(np.random.RandomState(9).randn(60, 3))
    assert fitted.n_features_in_ == 2 and fitted.module_ is module
    np.testing.assert_array_equal(fitted.score_samples(data), before)


def test_a_pickle_from_before_couplings_cv_and_power_transform_loads(fitted, data):
    # Estimators pickled before these parameters existed lack the attributes, and get_params
    # (repr, clone) failed on them. A fitted one behaves as fitted: neither the out-of-fold
    # check nor the layer (None); an unfitted one takes today's defaults.
    state = fitted.__getstate__()
    for name in ("couplings_cv", "power_transform", "kernel_bandwidth_", "kernel_shape_"):
        del state[name]
    old = RealNVPDensity.__new__(RealNVPDensity)
    old.__setstate__(state)
    assert old.get_params()["couplings_cv"] is None
    assert old.get_params()["power_transform"] is None
    assert old.kernel_bandwidth_ is None and old.kernel_shape_ is None
    assert "RealNVPDensity(" in repr(clone(old))
    np.testing.assert_array_equal(old.score_samples(data), fitted.score_samples(data))
    unfitted = RealNVPDensity()
    del unfitted.couplings_cv, unfitted.power_transform
    loaded = pickle.loads(pickle.dumps(unfitted))
    assert loaded.get_params()["couplings_cv"] == 5
    assert loaded.get_params()["power_transform"] == "auto"


def test_a_pickle_without_some_other_parameter_gets_its_default(fitted, data):
    state = fitted.__getstate__()
    del state["input_noise"], state["inference_dtype"]
    old = RealNVPDensity.__new__(RealNVPDensity)
    old.__setstate__(state)
    params = old.get_params()
    assert params["input_noise"] == 0.0 and params["inference_dtype"] == "float64"
    np.testing.assert_array_equal(old.score_samples(data), fitted.score_samples(data))
