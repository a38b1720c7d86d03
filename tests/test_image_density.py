"""Behaviour of RealNVPImageDensity: input layouts, units (log-density and bits/dim against
hand-computed cases), dequantisation, warm start, errors."""

import math
import pickle
import re

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from sklearn.base import clone
from sklearn.datasets import load_digits

from sknvp import RealNVPImageDensity, dequantized_bits_per_dim
from sknvp.multiscale import ResNetConditioner

TINY = {"n_blocks": 1, "n_channels": 4, "max_iter": 1, "early_stopping": False, "random_state": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions run far faster on one thread when other jobs share the CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits().data[:120]


@pytest.fixture(scope="module")
def fitted(digits):
    with pytest.warns(Warning):  # max_iter=1 does not converge
        return RealNVPImageDensity(n_levels=17, **TINY).fit(digits)


def _rgb(n=24, seed=0):
    return np.random.RandomState(seed).randint(0, 8, size=(n, 3, 4, 4)).astype(float)


# ----------------------------------------------------------- bits per dim


@pytest.mark.parametrize("n_levels, n_dims", [(2, 1), (17, 64), (256, 3072)])
def test_bits_per_dim_of_uniform_density_is_log2_levels(n_levels, n_dims):
    X = np.random.RandomState(0).randint(0, n_levels, size=(5, n_dims))

    def uniform_log_density(Z):
        inside = ((Z >= 0) & (Z < n_levels)).all(1)
        return np.where(inside, -n_dims * math.log(n_levels), -np.inf)

    bpd = dequantized_bits_per_dim(uniform_log_density, X, n_draws=3, random_state=0)
    assert bpd == pytest.approx(math.log2(n_levels), abs=1e-12)


def test_bits_per_dim_of_triangular_density_matches_hand_computation():
    # p(v) = 2 v / L^2 on [0, L) per pixel, independent pixels. For a level x,
    # E_u[-log p(x + u)] = -log(2 / L^2) - ((x + 1) log(x + 1) - x log x - 1).
    L = 8
    X = np.array([[0, 3, 7], [5, 5, 1]])

    def log_density(Z):
        return np.log(2 * Z / L**2).sum(1)

    def expected_nats(x):
        xlogx = x * math.log(x) if x > 0 else 0.0
        return -math.log(2 / L**2) - ((x + 1) * math.log(x + 1) - xlogx - 1)

    hand = np.mean([expected_nats(x) for x in X.ravel()]) / math.log(2)
    estimate = dequantized_bits_per_dim(log_density, X, n_draws=4000, random_state=0)
    assert estimate == pytest.approx(hand, abs=0.01)
    with pytest.raises(ValueError, match="n_draws"):
        dequantized_bits_per_dim(log_density, X, n_draws=0)


def _make_couplings_identity(est):
    with torch.no_grad():
        for m in est.module_.modules():
            if isinstance(m, ResNetConditioner):
                m.tail[-1].weight.zero_()
                m.tail[-1].bias.zero_()


def _logit_normal_log_density(V, L=17, alpha=0.05):
    """Closed form when every coupling is the identity: the latent is the logit itself."""
    p = alpha + (1 - 2 * alpha) * V / L
    y = np.log(p) - np.log1p(-p)
    per_pixel = stats.norm.logpdf(y) + np.log((1 - 2 * alpha) / L) - np.log(p) - np.log1p(-p)
    return per_pixel.reshape(len(V), -1).sum(1)


def test_score_samples_and_bits_per_dim_match_closed_form(digits):
    est = RealNVPImageDensity(n_levels=17, batch_norm=False, **TINY)
    with pytest.warns(Warning):
        est.fit(digits)
    _make_couplings_identity(est)
    V = np.random.RandomState(1).uniform(0, 17, size=(6, 64))
    np.testing.assert_allclose(est.score_samples(V), _logit_normal_log_density(V), rtol=1e-12)
    np.testing.assert_allclose(
        est.score_samples(V.reshape(6, 1, 8, 8)), _logit_normal_log_density(V), rtol=1e-12
    )
    # bits/dim of integer levels: per-level expectation over the dequantisation noise
    X = digits[:8]

    def nats(v):
        return -_logit_normal_log_density(np.array([[v]]))[0]

    per_level = {k: integrate.quad(lambda u, k=k: nats(k + u), 0, 1)[0] for k in range(17)}
    hand = np.mean([per_level[int(k)] for k in X.ravel()]) / math.log(2)
    assert est.bits_per_dim(X, n_draws=100, random_state=0) == pytest.approx(hand, abs=0.01)


def test_bits_per_dim_method_is_the_shared_conversion(fitted, digits):
    X = digits[:10]
    ours = fitted.bits_per_dim(X, n_draws=2, random_state=3)
    shared = dequantized_bits_per_dim(fitted.score_samples, X, n_draws=2, random_state=3)
    assert ours == shared
    assert fitted.bits_per_dim(X.reshape(10, 1, 8, 8), n_draws=2, random_state=3) == ours


def test_training_beats_a_uniform_model(digits):
    est = RealNVPImageDensity(
        n_levels=17,
        n_blocks=1,
        n_channels=8,
        max_iter=4,
        learning_rate_init=3e-3,
        early_stopping=False,
        random_state=0,
    )
    with pytest.warns(Warning):
        est.fit(load_digits().data[:400])
    assert est.loss_curve_[-1] < est.loss_curve_[0]
    assert est.bits_per_dim(load_digits().data[1000:1100], random_state=0) < math.log2(17) - 1


# ----------------------------------------------------------- input layouts


def test_flat_rows_in_flat_rows_out(fitted, digits):
    assert fitted.image_shape_ == (1, 8, 8) and fitted.n_scales_ == 2
    assert fitted.n_features_in_ == 64
    assert fitted.sample(3, random_state=0).shape == (3, 64)
    Z = fitted.transform(digits[:5])
    assert Z.shape == (5, 64)
    np.testing.assert_allclose(fitted.inverse_transform(Z), digits[:5], atol=1e-8)
    scores = fitted.score_samples(digits[:5] + 0.5)
    assert scores.shape == (5,) and np.isfinite(scores).all()
    assert fitted.score(digits[:5] + 0.5) == pytest.approx(scores.mean())


def test_four_d_images_in_four_d_out():
    X = _rgb()
    est = RealNVPImageDensity(n_levels=8, **TINY)
    with pytest.warns(Warning):
        est.fit(X)
    assert est.image_shape_ == (3, 4, 4) and est.n_scales_ == 1
    assert est.sample(2, random_state=0).shape == (2, 3, 4, 4)
    Z = est.transform(X[:4])
    assert Z.shape == (4, 3, 4, 4)
    np.testing.assert_allclose(est.inverse_transform(Z.reshape(4, -1)), X[:4], atol=1e-8)
    np.testing.assert_array_equal(
        est.score_samples(X[:4]), est.score_samples(X[:4].reshape(4, -1))
    )
    with pytest.warns(Warning):
        assert est.fit_transform(X).shape == X.shape


def test_three_d_grayscale_and_explicit_shape():
    X = load_digits().data[:40].reshape(40, 8, 8)
    est = RealNVPImageDensity(n_levels=17, n_scales=3, **TINY)
    with pytest.warns(Warning):
        est.fit(X)
    assert est.image_shape_ == (1, 8, 8) and est.n_scales_ == 3
    assert est.sample(2, random_state=0).shape == (2, 8, 8)
    flat = RealNVPImageDensity(image_shape=(3, 4, 4), n_levels=8, **TINY)
    with pytest.warns(Warning):
        flat.fit(_rgb().reshape(24, -1))
    assert flat.image_shape_ == (3, 4, 4) and flat.sample(1).shape == (1, 48)


@pytest.mark.parametrize(
    "params, X, message",
    [
        ({}, np.zeros((10, 48)), "image_shape=None needs square one-channel images"),
        ({"image_shape": (1, 8, 8)}, np.zeros((10, 48)), "Expected n_features = channels"),
        ({"image_shape": (1, 4, 4)}, _rgb(10), "Expected images of shape"),
        ({"n_levels": 17}, np.full((10, 64), 17.0), "Expected pixel levels in [0, 16]"),
        (
            {"n_levels": 17, "dequantize": False},
            np.full((10, 64), -1.0),
            "Expected pixel levels in [0, 17]",
        ),
        ({"n_scales": 4}, np.zeros((10, 64)), "n_scales=4 does not fit"),
    ],
)
def test_errors(params, X, message):
    est = RealNVPImageDensity(**{**TINY, **params})
    with pytest.raises(ValueError, match=re.escape(message)):
        est.fit(X)


def test_wrong_image_shape_at_inference(fitted):
    with pytest.raises(ValueError, match=re.escape("Expected images of shape")):
        fitted.score_samples(np.zeros((2, 1, 4, 16)))
    with pytest.raises(ValueError, match="temperature"):
        fitted.sample(2, temperature=0)


def test_failed_refit_leaves_the_fitted_model_untouched():
    # A refit on flat rows that fails after the input layout was read must not leave the 4-D
    # layout of the first fit replaced: samples keep the shape the model was fitted on.
    X = _rgb()
    est = RealNVPImageDensity(n_levels=8, **TINY)
    with pytest.warns(Warning):
        est.fit(X)
    before = est.score_samples(X[:3])
    with pytest.raises(ValueError, match="needs square one-channel images"):
        est.fit(X.reshape(len(X), -1))
    assert est.n_features_in_ == 48
    assert est.sample(2, random_state=0).shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(est.score_samples(X[:3]), before)
    with pytest.raises(TypeError, match="temperature"):
        est.sample(2, temperature="hot")


# ------------------------------------------------- training behaviour


def test_dequantisation_hook_adds_fresh_uniform_noise():
    est = RealNVPImageDensity(n_levels=17)
    add_noise = est._batch_transform(torch.Generator().manual_seed(0), None)
    x = torch.zeros(200, 64, dtype=torch.float64)
    a, b = add_noise(x), add_noise(x)
    assert ((a >= 0) & (a < 1)).all() and abs(float(a.mean()) - 0.5) < 0.01
    assert not torch.equal(a, b)
    assert RealNVPImageDensity(dequantize=False)._batch_transform(torch.Generator(), None) is None


def test_verbose_prints_bits_per_dim(digits, capsys):
    est = RealNVPImageDensity(
        n_levels=17,
        n_blocks=1,
        n_channels=4,
        max_iter=2,
        verbose=1,
        validation_fraction=0.2,
        random_state=0,
    )
    with pytest.warns(Warning):
        est.fit(digits)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"Epoch 1: train \d+\.\d+ bits/dim, validation \d+\.\d+ bits/dim", lines[0]
    )
    shown = float(lines[1].split("validation ")[1].split()[0])
    assert shown == pytest.approx(-est.validation_scores_[-1] / (64 * math.log(2)), abs=1e-4)


def test_warm_start_resumes(digits):
    est = RealNVPImageDensity(n_levels=17, **{**TINY, "random_state": 1})
    with pytest.warns(Warning):
        est.fit(digits)
    first = [p.clone() for p in est.module_.parameters()]
    est.set_params(warm_start=True)
    with pytest.warns(Warning):
        est.fit(digits)
    assert est.n_iter_ == 2 and len(est.loss_curve_) == 2
    cold = clone(est).set_params(warm_start=False, max_iter=1)
    with pytest.warns(Warning):
        cold.fit(digits)
    assert not all(torch.equal(a, b) for a, b in zip(first, est.module_.parameters(), strict=True))
    assert est.loss_curve_[1] != cold.loss_curve_[0]  # continued, not restarted


def test_reproducible_clone_and_pickle(fitted, digits):
    again = clone(fitted)
    assert again.get_params() == fitted.get_params()
    with pytest.warns(Warning):
        again.fit(digits)
    X = digits[:5] + 0.3
    np.testing.assert_array_equal(again.score_samples(X), fitted.score_samples(X))
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.score_samples(X), fitted.score_samples(X))
    np.testing.assert_array_equal(
        restored.sample(3, random_state=2), fitted.sample(3, random_state=2)
    )


def test_inference_is_float64_on_cpu_and_batch_invariant(fitted, digits):
    assert next(fitted.module_.parameters()).dtype == torch.float64
    X = digits[:6] + 0.5
    one_by_one = np.concatenate([fitted.score_samples(X[i : i + 1]) for i in range(6)])
    np.testing.assert_allclose(one_by_one, fitted.score_samples(X), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["digits", "throughput"])
def test_bench_images_quick_runs(mode, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_images.py"
    spec = importlib.util.spec_from_file_location("bench_images", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--mode", mode, "--out", str(tmp_path), "--doc", "none"]) == 0
    produced = {p.name for p in tmp_path.iterdir()}
    expected = (
        {"results.json", "results.md", "digits.png"}
        if mode == "digits"
        else {"throughput.json", "throughput.md"}
    )
    assert expected <= produced
