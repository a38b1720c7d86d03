"""The sinh-arcsinh tail layer (sknvp.power) and the estimator's ``heavy_tails``."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_moons
from strategies import seeds
from test_power import _fit  # the same small flows

from sknvp import RealNVPDensity
from sknvp.power import (
    DELTA_RANGE,
    SinhArcsinh,
    YeoJohnson,
    fit_marginal_maps,
    fit_yeo_johnson,
    sinh_arcsinh,
    sinh_arcsinh_inverse,
)

deltas = st.one_of(st.sampled_from([0.0, 1e-13, 1.0]), st.floats(*DELTA_RANGE))
values = st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=20)


def _t(delta):
    return torch.tensor(delta, dtype=torch.float64)


@given(delta=deltas, u=values)
def test_map_is_sinh_of_delta_asinh_over_delta(delta, u):
    u = np.array(u)
    got = sinh_arcsinh(torch.tensor(u), _t(delta))[0].numpy()
    want = np.arcsinh(u) if delta < 1e-12 else np.sinh(delta * np.arcsinh(u)) / delta
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@given(delta=deltas, u=values)
def test_inverse_undoes_the_map_and_log_derivatives_cancel(delta, u):
    u = torch.tensor(u, dtype=torch.float64)
    v, log_d = sinh_arcsinh(u, _t(delta))
    back, log_d_inv = sinh_arcsinh_inverse(v, _t(delta))
    np.testing.assert_allclose(back.numpy(), u.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose((log_d + log_d_inv).numpy(), 0.0, atol=1e-9)


@given(delta=deltas, u=values)
def test_log_derivative_is_autograds_and_gradients_are_finite(delta, u):
    # The limit's branch is evaluated everywhere: it must not put NaN in a gradient.
    u = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    v, log_d = sinh_arcsinh(u, _t(delta))
    (grad,) = torch.autograd.grad(v.sum(), u)
    assert torch.isfinite(grad).all() and (grad > 0).all()
    np.testing.assert_allclose(torch.log(grad).numpy(), log_d.detach().numpy(), atol=1e-9)


def test_weight_one_is_the_identity_and_far_values_do_not_overflow():
    u = torch.tensor([-1e300, -3.0, 0.0, 0.5, 1e300], dtype=torch.float64)
    v, log_d = sinh_arcsinh(u, _t(1.0))
    np.testing.assert_allclose(v.numpy(), u.numpy(), rtol=1e-12)
    np.testing.assert_allclose(log_d.numpy(), 0.0, atol=1e-12)
    v, log_d = sinh_arcsinh(u, _t(0.0))  # asinh: about +-691 at 1e300
    assert torch.isfinite(v).all() and torch.isfinite(log_d).all()
    np.testing.assert_allclose(float(log_d[-1]), -np.log(1e300), rtol=1e-12)


def test_the_limit_at_zero_is_continuous():
    u = torch.linspace(-1e4, 1e4, 2001, dtype=torch.float64)
    at0 = sinh_arcsinh(u, _t(0.0))
    near = sinh_arcsinh(u, _t(1e-9))
    for a, b in zip(at0, near, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-7, atol=1e-12)


def test_layer_rejects_negative_or_non_finite_weights():
    for bad in ([1.0, -0.5], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="tail weights"):
            SinhArcsinh(torch.tensor(bad))


@settings(deadline=None)
@given(d=st.integers(1, 4), seed=seeds)
def test_layer_log_det_is_autograds_jacobian(d, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = SinhArcsinh(torch.rand(d, generator=gen, dtype=torch.float64))
    x = 5.0 * torch.randn(d, generator=gen, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x)
    y, log_det = layer(x[None])
    np.testing.assert_allclose(float(log_det[0]), float(torch.linalg.slogdet(jac)[1]), atol=1e-9)
    back, inv_log_det = layer.inverse(y)
    np.testing.assert_allclose(back[0].numpy(), x.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(float(inv_log_det[0]), -float(log_det[0]), atol=1e-9)


# ---------------------------------------------------------------------- fitting


def _columns(*cols):
    return torch.as_tensor(np.column_stack([(c - c.mean()) / (c.std() or 1.0) for c in cols]))


def test_heavy_tails_get_a_weight_and_light_ones_do_not():
    rng = np.random.RandomState(0)
    n = 3000
    z = _columns(rng.randn(n), rng.standard_cauchy(n), rng.standard_t(3, n), rng.rand(n),
                 np.exp(rng.randn(n)), np.full(n, 2.0))
    lmbda, loc, scale, delta = (v.numpy() for v in fit_marginal_maps(z))
    assert delta[0] == 1.0 and lmbda[0] == 1.0  # Gaussian: the identity
    assert delta[1] < 0.05  # Cauchy: towards asinh
    assert delta[2] < 0.5  # Student-t, 3 degrees of freedom
    assert delta[3] == 1.0  # uniform: light tails are not drawn out
    assert lmbda[4] < 0.3  # lognormal: the exponent draws the skew in (a tail weight may help)
    assert delta[5] == 1.0 and lmbda[5] == 1.0  # constant
    # loc and scale standardise the columns after the exponents
    from sknvp.power import yeo_johnson

    y = yeo_johnson(z, torch.as_tensor(lmbda))[0].numpy()
    np.testing.assert_allclose(loc, y.mean(0), atol=1e-12)
    np.testing.assert_allclose(scale[:5], y.std(0)[:5], rtol=1e-10)


def test_without_tails_the_exponents_are_fit_yeo_johnsons():
    rng = np.random.RandomState(1)
    z = _columns(rng.standard_cauchy(800), rng.gamma(2.0, size=800), rng.randn(800))
    lmbda, _, _, delta = fit_marginal_maps(z, tails=False)
    np.testing.assert_array_equal(lmbda.numpy(), fit_yeo_johnson(z).numpy())
    assert (delta == 1.0).all()


def test_rows_of_weight_zero_do_not_count_in_the_weights():
    rng = np.random.RandomState(2)
    z = _columns(rng.standard_t(2, 600), rng.randn(600))
    w = torch.as_tensor((rng.rand(600) < 0.5).astype(float))
    got = fit_marginal_maps(z, w)
    want = fit_marginal_maps(z[w > 0])
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def test_many_rows_are_fitted_on_a_seeded_subsample():
    rng = np.random.RandomState(3)
    z = _columns(rng.standard_t(2, 30_000))
    first, again = fit_marginal_maps(z), fit_marginal_maps(z)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert float(first[3][0]) < 0.5


# ----------------------------------------------------------------- the estimator


def _cauchy(n, d, seed):
    return np.random.RandomState(seed).standard_cauchy((n, d))


def test_cauchy_data_get_tail_weights_and_score_far_higher():
    X, T = _cauchy(2000, 2, 0), _cauchy(4000, 2, 1)
    auto, light = _fit(X), _fit(X, heavy_tails=False)
    assert light.tail_weights_ is None
    assert auto.tail_weights_ is not None and (auto.tail_weights_ < 0.1).all()
    assert auto.power_lambdas_ is not None  # the layer before it, exponents 1 or fitted
    assert auto.score(T) > light.score(T) + 0.5
    assert auto.score(T) > -5.5  # the truth: 2 log(1 / pi) - E log(1 + x^2) ~ -5.06
    samples = auto.sample(5000, random_state=0)
    assert np.isfinite(samples).all()
    # Heavy tails come out in the samples too: a Cauchy has 6.3 % of its mass beyond 10.
    assert 0.03 < (np.abs(samples[:, 0]) > 10).mean() < 0.12


def test_data_without_heavy_tails_fit_as_without_the_option():
    X = make_moons(400, noise=0.05, random_state=0)[0]
    on, off = _fit(X), _fit(X, heavy_tails=False)
    assert on.tail_weights_ is None
    np.testing.assert_array_equal(on.score_samples(X), off.score_samples(X))
    skewed = np.random.RandomState(4).beta(2.0, 5.0, (800, 2))  # skewed, light tails
    on, off = _fit(skewed), _fit(skewed, heavy_tails=False)
    assert on.tail_weights_ is None and on.power_lambdas_ is not None
    np.testing.assert_array_equal(on.score_samples(skewed), off.score_samples(skewed))


def test_power_transform_none_has_no_tail_layer_either():
    X = _cauchy(500, 2, 5)
    est = _fit(X, power_transform=None)
    assert est.tail_weights_ is None and est.power_lambdas_ is None


def test_folds_keep_the_fits_choice_of_tails(monkeypatch):
    # The out-of-fold refits after training fit their map with tails only where this
    # fit kept tails (they used heavy_tails=True whatever the fit chose).
    import sknvp._density as density

    calls = []
    real = density._power_transform

    def spy(X, sample_weight, tails=False):
        calls.append(tails)
        return real(X, sample_weight, tails)

    monkeypatch.setattr(density, "_power_transform", spy)
    est = _fit(np.exp(np.random.RandomState(6).randn(400, 2)), max_iter=5)
    assert est.power_lambdas_ is not None and est.tail_weights_ is None
    assert calls[0] is True  # the fit itself may use tails
    assert calls.count(False) >= 5  # one refit per fold, without
    calls.clear()
    est = _fit(_cauchy(400, 2, 6), max_iter=5)
    assert est.tail_weights_ is not None
    assert len(calls) > 6 and all(calls)


def test_old_pickles_without_heavy_tails_load_with_tails_off():
    X = _cauchy(300, 2, 7)
    est = _fit(X, heavy_tails=False, max_iter=3)
    state = est.__getstate__()
    state.pop("heavy_tails")
    old = RealNVPDensity.__new__(RealNVPDensity)
    old.__setstate__(state)
    assert old.get_params()["heavy_tails"] is False
    fresh = RealNVPDensity()
    state = fresh.__getstate__()
    state.pop("heavy_tails")
    unfitted = RealNVPDensity.__new__(RealNVPDensity)
    unfitted.__setstate__(state)
    assert unfitted.get_params()["heavy_tails"] is True


def test_whitening_and_kernel_axes_after_the_tail_layer():
    rng = np.random.RandomState(8)
    X = rng.standard_t(2, (2000, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3],
                                                  [0.0, 0.0, 1.0]])
    est = RealNVPDensity(power_transform="yeo-johnson", whiten=True, base="normal",
                         random_state=0)
    sizes, mask = est._check_params(3)
    flow = est._build_module(X, np.ones(len(X)), sizes, mask, True, 0)
    layers = list(flow.transform)
    assert any(isinstance(m, SinhArcsinh) for m in layers)
    assert any(isinstance(m, YeoJohnson) for m in layers)
    with torch.no_grad():
        u = flow.transform(torch.as_tensor(X))[0].numpy()
    np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(3), atol=1e-4)


@settings(deadline=None)
@given(delta=st.lists(deltas, min_size=1, max_size=4), seed=seeds)
def test_layer_without_autograd_is_the_autograd_path(delta, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = SinhArcsinh(torch.tensor(delta, dtype=torch.float64))
    x = 10.0 * torch.randn(50, len(delta), generator=gen, dtype=torch.float64)
    x[0] = 1e150  # far out: no overflow on either path
    with torch.enable_grad():
        want = layer(x)
        want_inv = layer.inverse(want[0])
    with torch.no_grad():
        got = layer(x)
        got_inv = layer.inverse(got[0])
    for a, b in zip((*got, *got_inv), (*want, *want_inv), strict=True):
        assert torch.isfinite(a).all()
        np.testing.assert_allclose(a.numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("delta", [[1.0, 0.3, 1.0, 0.0], [1.0, 1.0], [0.5, 0.2]])
def test_layer_without_autograd_leaves_features_of_weight_one_exactly(delta):
    # Inference maps only the features whose weight is not 1 (fitted layers move a few of
    # many): the others come back bit for bit, with log-determinant 0; the rest is the
    # autograd path's to rounding, and the input is left alone.
    layer = SinhArcsinh(torch.tensor(delta, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    x = 10.0 * torch.randn(40, len(delta), generator=gen, dtype=torch.float64)
    x_before = x.clone()
    with torch.enable_grad():
        want = layer(x)
    with torch.no_grad():
        y, log_det = layer(x)
        back, inv_log_det = layer.inverse(y)
    assert torch.equal(x, x_before) and y is not x and back is not y
    ones = torch.tensor(delta) == 1.0
    assert torch.equal(y[:, ones], x[:, ones]) and torch.equal(back[:, ones], x[:, ones])
    np.testing.assert_allclose(y.numpy(), want[0].detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_det.numpy(), want[1].detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(back.numpy(), x.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(inv_log_det.numpy(), -log_det.numpy(), atol=1e-10)
    if bool(ones.all()):
        assert not log_det.any() and not inv_log_det.any()


def test_exponents_alone_leave_out_the_features_with_a_tail_weight():
    from sknvp._density import _exponents_only, _map_at

    ones = torch.ones(3, dtype=torch.float64)
    lmbda = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    delta = torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64)
    power = (ones, ones, lmbda, ones, ones, delta)
    *_, got = _exponents_only(power)
    np.testing.assert_array_equal(got.numpy(), [0.5, 1.0, 1.0])
    light = power[:3]
    assert _exponents_only(light) is light
    assert _exponents_only((ones, ones, torch.tensor([1.0, 2.0, 1.0]), ones, ones, delta)) is None
    assert _map_at(power, 0) is None and _map_at(power, 2) is power and _map_at(None, 1) is None


def test_auto_judges_the_exponents_then_the_tails(capsys):
    # A skewed feature beside a heavy-tailed one: exponents first (the heavy-tailed
    # feature left out), then the tail weights against the start with the exponents.
    rng = np.random.RandomState(9)
    X = np.column_stack([rng.beta(2.0, 5.0, 3000), rng.standard_cauchy(3000)])
    est = _fit(X, verbose=1, max_iter=2)
    out = capsys.readouterr().out
    first = out.index("Yeo-Johnson start against the plain one, on the validation rows")
    # against the Yeo-Johnson start if that was kept, else against the plain one
    kept = "transform kept" in out[first:].splitlines()[0]
    second = out.index("tail-weighted start against the "
                       + ("Yeo-Johnson" if kept else "plain") + " one")
    assert first < second
    assert (est.tail_weights_ is not None) == out[second:].splitlines()[0].endswith(
        "transform kept")
    # Only heavy tails: the exponents-only candidate is empty, the tails face the plain start.
    _fit(_cauchy(3000, 2, 10), verbose=1, max_iter=2)
    out = capsys.readouterr().out
    assert "Yeo-Johnson start" not in out
    assert "tail-weighted start against the plain one" in out


def test_kernel_axes_are_taken_after_the_tail_layer():
    # A kernel base's axes are the Jacobian of the (affine) layers after the last fixed
    # element-wise layer: here the flow's own standardisation, scale (2, 4).
    from sknvp._density import _feature_axes
    from sknvp.flows import build_realnvp

    ones = torch.ones(2, dtype=torch.float64)
    flow = build_realnvp(
        2, n_couplings=2, hidden_layer_sizes=(4,), loc=torch.zeros(2),
        scale=torch.tensor([2.0, 4.0]),
        power=(ones, ones, torch.tensor([0.5, 1.0]), ones, ones, torch.tensor([0.0, 0.3])),
    ).double()
    axes = _feature_axes(flow, torch.tensor([[30.0, -7.0]], dtype=torch.float64))
    np.testing.assert_allclose(axes.numpy(), np.diag([1.0, 0.5]), atol=1e-12)
