"""The hand-derived gradient of sknvp._backprop against autograd, and where it applies."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sknvp import RealNVPDensity
from sknvp._backprop import manual_gradient
from sknvp._training import fit_flow
from sknvp.flows import build_realnvp
from sknvp.multiscale import build_multiscale

from strategies import activations, mask_kinds, random_mixture, randomize_, seeds


def _flow(d, k, sizes, activation, mask, whiten, seed, scale_bound=2.0, n_components=0):
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(d, generator=gen, dtype=torch.float64)
    scale = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    whitening = None
    if whiten:
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        whitening = torch.linalg.cholesky(a @ a.T / d + torch.eye(d, dtype=torch.float64))
    torch.manual_seed(seed)
    flow = build_realnvp(
        d, k, sizes, activation, mask, scale_bound=scale_bound, loc=loc, scale=scale,
        whitening=whitening, generator=gen,
        base=random_mixture(n_components, d, seed) if n_components else None,
    ).double()
    return randomize_(flow, seed, scale=0.3)


def _autograd_loss_and_grads(flow, x, w):
    for p in flow.parameters():
        p.grad = None
    log_p = flow.log_prob(x)
    loss = -(log_p.mean() if w is None else (log_p * w).sum() / w.sum())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in flow.parameters()]


def _manual_loss_and_grads(flow, x, w):
    manual = manual_gradient(flow)
    assert manual is not None
    loss = manual.loss_and_grad(x, w)
    return loss, [p.grad.clone() for p in flow.parameters()]


@given(
    d=st.integers(2, 9),
    k=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    activation=activations,
    mask=mask_kinds,
    whiten=st.booleans(),
    weighted=st.booleans(),
    scale_bound=st.sampled_from([0.5, 2.0, 7.0]),
    n_components=st.integers(0, 4),  # 0: the standard normal base
    seed=seeds,
)
def test_manual_gradient_equals_autograd(
    d, k, sizes, activation, mask, whiten, weighted, scale_bound, n_components, seed
):
    flow = _flow(d, k, tuple(sizes), activation, mask, whiten, seed, scale_bound, n_components)
    assert (flow.base is None) == (n_components == 0)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(33, d, generator=gen, dtype=torch.float64) * 1.5
    w = torch.rand(33, generator=gen, dtype=torch.float64) if weighted else None
    ref_loss, ref_grads = _autograd_loss_and_grads(flow, x, w)
    loss, grads = _manual_loss_and_grads(flow, x, w)
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)


def test_manual_gradients_are_overwritten_not_accumulated():
    flow = _flow(4, 3, (8, 8), "relu", "alternating", False, 0)
    x = torch.randn(20, 4, dtype=torch.float64)
    manual = manual_gradient(flow)
    manual.loss_and_grad(torch.randn(20, 4, dtype=torch.float64))  # other data first
    manual.loss_and_grad(x)
    _, ref = _autograd_loss_and_grads(flow, x, None)
    manual.loss_and_grad(x)
    for p, g in zip(flow.parameters(), ref, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14)


def test_manual_gradient_does_not_change_the_flow_or_its_input():
    flow = _flow(3, 2, (6,), "tanh", "alternating", True, 1)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    x = torch.randn(10, 3, dtype=torch.float64)
    x0 = x.clone()
    manual_gradient(flow).loss_and_grad(x)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())


def test_manual_gradient_is_only_used_where_it_is_exact():
    torch.manual_seed(0)
    assert manual_gradient(build_realnvp(3, 2, (4,))) is not None
    # batch norm, a single feature (masked coupling), custom activations, hooks, images
    assert manual_gradient(build_realnvp(3, 2, (4,), batch_norm=True)) is None
    assert manual_gradient(build_realnvp(1, 2, (4,))) is None
    assert manual_gradient(build_realnvp(3, 2, (4,), activation=lambda: nn.Softplus())) is None
    hooked = build_realnvp(3, 2, (4,))
    hooked.transform[0].conditioner[0].register_forward_hook(lambda *a: None)
    assert manual_gradient(hooked) is None
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert manual_gradient(build_realnvp(3, 2, (4,))) is None
    finally:
        handle.remove()
    frozen = build_realnvp(3, 2, (4,))
    next(frozen.parameters()).requires_grad_(False)
    assert manual_gradient(frozen) is None
    image = build_multiscale((1, 4, 4), n_scales=1, n_channels=4, n_blocks=1)
    assert manual_gradient(image) is None
    # a mixture base is supported; a base of another kind (here a subclass) is not
    assert manual_gradient(build_realnvp(3, 2, (4,), base=random_mixture(2, 3, 0))) is not None

    class OtherBase(type(random_mixture(2, 3, 0))):
        pass

    other = build_realnvp(3, 2, (4,), base=random_mixture(2, 3, 0))
    other.base.__class__ = OtherBase
    assert manual_gradient(other) is None


def test_fit_flow_rejects_an_unknown_backprop():
    torch.manual_seed(0)
    flow = build_realnvp(2, 2, (4,))
    with pytest.raises(ValueError, match="backprop"):
        fit_flow(flow, torch.randn(10, 2), max_iter=1, backprop="numerical")


@pytest.mark.parametrize("weighted", [False, True])
def test_training_with_the_manual_gradient_follows_autograd(weighted):
    # float64, a few epochs: the two gradients differ by rounding, so the weights agree to
    # far better than any effect on a fit.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    x[:, 2] = x[:, 0] ** 2 + 0.1 * x[:, 2]
    w = torch.rand(300, generator=gen, dtype=torch.float64) if weighted else None
    fits = {}
    for backprop in ("auto", "autograd"):
        flow = _flow(3, 4, (16, 16), "relu", "alternating", False, 3)
        result, _ = fit_flow(
            flow, x, w_train=w, max_iter=5, batch_size=64, learning_rate_init=1e-2,
            generator=torch.Generator().manual_seed(1), backprop=backprop,
        )
        fits[backprop] = (result, torch.cat([p.detach().reshape(-1) for p in flow.parameters()]))
    (res_m, p_m), (res_a, p_a) = fits["auto"], fits["autograd"]
    assert res_m.n_iter == res_a.n_iter == 5
    assert np.allclose(res_m.loss_curve, res_a.loss_curve, rtol=1e-9)
    assert torch.allclose(p_m, p_a, rtol=1e-7, atol=1e-9)
    assert res_m.loss_curve[-1] < res_m.loss_curve[0]  # and it trains


def test_estimator_fits_the_same_with_either_gradient(monkeypatch):
    import sknvp._training as training

    X = np.random.RandomState(0).standard_normal((400, 2)) @ [[1.0, 0.6], [0.0, 0.5]]
    params = dict(n_couplings=3, hidden_layer_sizes=(16,), max_iter=4, dtype="float64",
                  random_state=0)
    manual = RealNVPDensity(**params).fit(X)
    monkeypatch.setattr(training, "manual_gradient", lambda module: None)
    auto = RealNVPDensity(**params).fit(X)
    assert np.allclose(manual.loss_curve_, auto.loss_curve_, rtol=1e-9)
    assert np.allclose(manual.score_samples(X), auto.score_samples(X), rtol=1e-7, atol=1e-9)
    assert math.isfinite(manual.score(X))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_manual_gradient_equals_autograd_on_a_large_batch(activation):
    # Enough rows x transformed features for the scale bound's sigmoid form of tanh.
    from sknvp import _backprop

    d, n = 32, 600
    assert n * d // 2 >= _backprop._SIGMOID_TANH_MIN
    flow = _flow(d, 2, (16,), activation, "alternating", False, 5)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_loss, ref_grads = _autograd_loss_and_grads(flow, x, None)
    loss, grads = _manual_loss_and_grads(flow, x, None)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backprop", ["auto", "autograd"])
def test_a_batch_with_a_non_finite_loss_is_skipped_with_either_gradient(backprop):
    calls = {"n": 0}

    def poison_second_batch(xb):
        calls["n"] += 1
        if calls["n"] == 2:
            xb = xb.clone()
            xb[0, 0] = math.inf
        return xb

    flow = _flow(3, 2, (8,), "relu", "alternating", False, 4)
    x = torch.randn(128, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result, _ = fit_flow(
        flow, x, max_iter=2, batch_size=32, learning_rate_init=1e-2,
        generator=torch.Generator().manual_seed(0), transform_batch=poison_second_batch,
        backprop=backprop,
    )
    assert result.skipped_steps == 1 and not result.diverged
    assert all(bool(torch.isfinite(p).all()) for p in flow.parameters())
    assert all(math.isfinite(v) for v in result.loss_curve)


@pytest.mark.parametrize("d", [2, 5, 8])
@pytest.mark.parametrize("n_components", [0, 2])
@pytest.mark.parametrize("mask", ["alternating", "checkerboard", "permuted", "random"])
def test_runs_of_couplings_keep_their_parts_apart_with_the_same_gradients(d, n_components, mask):
    # Consecutive couplings that keep one of the same two index sets form a run, which the
    # manual gradient splits once and joins once (slices for the halves' blocks, gathers for
    # other sets); the result must be the per-coupling split-and-join computation's, and
    # autograd's.
    flow = _flow(d, 4, (7, 6), "relu", mask, False, 3, n_components=n_components)
    manual = manual_gradient(flow)
    runs = manual.runs
    assert [r.start for r in runs] == [0] + [r.stop for r in runs[:-1]] and runs[-1].stop == 4
    for run in runs:
        assert int(run.left[0]) < int(run.right[0])
        assert sorted(torch.cat([run.left, run.right]).tolist()) == list(range(d))
    if mask in ("alternating", "checkerboard") or (mask == "permuted" and d == 2):
        assert len(runs) == 1
        blocks = mask != "checkerboard" or d == 2
        assert runs[0].boundary == (len(runs[0].left) if blocks else None)
    elif mask == "permuted":
        assert len(runs) == 2  # a new permutation for the second pair of couplings
    x = torch.randn(21, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.rand(21, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for weights in (None, w):
        ref_loss, ref_grads = _autograd_loss_and_grads(flow, x, weights)
        loss = manual.loss_and_grad(x, weights)
        parted = [p.grad.clone() for p in flow.parameters()]
        manual.runs = None  # the split-and-join path
        joined_loss = manual.loss_and_grad(x, weights)
        joined = [p.grad.clone() for p in flow.parameters()]
        manual.runs = runs
        assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-12)
        assert torch.allclose(joined_loss, loss, rtol=1e-13, atol=1e-13)
        for g, g_joined, ref in zip(parted, joined, ref_grads, strict=True):
            assert torch.allclose(g, ref, rtol=1e-9, atol=1e-12)
            assert torch.allclose(g, g_joined, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("n_components", [0, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_fresh_flow_is_scored_without_its_couplings(whiten, n_components, weighted):
    # A fresh flow's couplings are the identity (zero last layers): its initial score goes
    # through the fixed layers and the base only, and must equal the full pass's.
    from sknvp._training import _initial_score, _validation_score

    torch.manual_seed(0)
    d = 5
    gen = torch.Generator().manual_seed(0)
    flow = build_realnvp(
        d, 4, (8, 8), "relu", "alternating", loc=torch.randn(d, dtype=torch.float64),
        scale=torch.rand(d, dtype=torch.float64) + 0.5, generator=gen,
        whitening=torch.eye(d, dtype=torch.float64) * 1.3 if whiten else None,
        base=random_mixture(n_components, d, 0) if n_components else None,
    ).double()
    manual = manual_gradient(flow)
    assert manual.couplings_are_identity()
    x = torch.randn(50, d, generator=gen, dtype=torch.float64) * 2
    w = torch.rand(50, generator=gen, dtype=torch.float64) if weighted else None
    full = _validation_score(flow, x, w)
    assert _initial_score(flow, manual, x, w) == pytest.approx(full, rel=1e-14, abs=1e-14)
    randomize_(flow, 1, scale=0.3)  # trained couplings: the full pass again
    assert not manual.couplings_are_identity()
    assert _initial_score(flow, manual, x, w) == _validation_score(flow, x, w)
    assert _validation_score(flow, x, w) != pytest.approx(full)
