"""Property tests of the torch layer: exact inverses and log-determinants equal to autograd's."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import activations, mask_kinds, n_couplings, n_features, randomize_, seeds

from sknvp import transforms
from sknvp.flows import build_realnvp
from sknvp.masks import alternating_mask, coupling_masks, parity_mask
from sknvp.nets import MLP, tanh_
from sknvp.transforms import (
    AffineCoupling,
    BatchNormFlow,
    FlowSequential,
    SplitAffineCoupling,
    Standardize,
)

ATOL = 1e-9


def _flow(d, k, kind, act, batch_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = build_realnvp(
            d, k, (8, 8), act, kind, batch_norm, 2.0,
            loc=torch.randn(d, generator=gen), scale=torch.rand(d, generator=gen) + 0.5,
            generator=gen,
        ).double()
    return randomize_(flow, seed).eval()


def _inputs(d, seed, n=7):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 1)).double() * 2


def _autograd_log_det(fn, x):
    """log|det J| of ``fn`` at each row of ``x``, from the full autograd Jacobian."""
    rows = []
    for row in x:
        jac = torch.autograd.functional.jacobian(
            lambda v: fn(v.unsqueeze(0))[0].squeeze(0), row, vectorize=True
        )
        rows.append(torch.linalg.slogdet(jac.reshape(row.numel(), row.numel()))[1])
    return torch.stack(rows)


@given(n_features, n_couplings, mask_kinds, activations, st.booleans(), seeds)
def test_flow_inverse_roundtrip(d, k, kind, act, batch_norm, seed):
    # inverse(forward(x)) == x and forward(inverse(z)) == z, with log-dets of opposite sign.
    # A round trip's error grows with the largest value it passes through (its rounding
    # there, carried back through the Jacobian), so the tolerance scales with the
    # intermediate's size (d=16, k=5, gelu, seed 2430 maps rows of size 5 to 1,003 and back
    # within 4.3e-9: a fixed 1e-9 failed it, on the code before and after 2026-12-07).
    flow = _flow(d, k, kind, act, batch_norm, seed)
    x = _inputs(d, seed)
    with torch.no_grad():
        z, ld = flow(x)
        x_back, ld_inv = flow.inverse(z)
        x_inv = flow.inverse(x)[0]
        z_back, _ = flow(x_inv)
    for back, middle in ((x_back, z), (z_back, x_inv)):
        size = max(1.0, float(middle.abs().max()))
        torch.testing.assert_close(back, x, atol=ATOL * size, rtol=1e-9)
    torch.testing.assert_close(ld_inv, -ld, atol=ATOL, rtol=1e-9)


@settings(max_examples=15)
@given(n_features, n_couplings, mask_kinds, activations, st.booleans(), seeds)
def test_flow_log_det_matches_autograd(d, k, kind, act, batch_norm, seed):
    # The summed triangular log-det equals log|det J| of the full autograd Jacobian.
    flow = _flow(d, k, kind, act, batch_norm, seed)
    x = _inputs(d, seed, n=3)
    _, ld = flow(x)
    torch.testing.assert_close(ld, _autograd_log_det(flow, x), atol=1e-8, rtol=1e-8)
    z = _inputs(d, seed + 7, n=3)
    _, ld_inv = flow.inverse(z)
    torch.testing.assert_close(ld_inv, _autograd_log_det(flow.inverse, z), atol=1e-8, rtol=1e-8)


@given(st.integers(2, 8), seeds)
def test_batch_norm_training_mode_log_det_matches_autograd(d, seed):
    # In training mode the batch statistics depend on the batch, so the per-sample log-det is
    # the diagonal term; check it against autograd with statistics held fixed.
    layer = randomize_(BatchNormFlow(d).double(), seed).train()
    x = _inputs(d, seed, n=16)
    z, ld = layer(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    expected = (layer.log_gamma - 0.5 * torch.log(var + layer.eps)).sum().expand(16)
    torch.testing.assert_close(ld, expected)
    torch.testing.assert_close(
        z, (x - mean) / torch.sqrt(var + layer.eps) * layer.log_gamma.exp() + layer.beta
    )


@given(n_features, n_couplings, seeds)
def test_stack_log_dets_add_up(d, k, seed):
    flow = _flow(d, k, "alternating", "tanh", True, seed)
    x = _inputs(d, seed)
    total = torch.zeros(len(x), dtype=x.dtype)
    h = x
    with torch.no_grad():
        for layer in flow.transform:
            h, ld = layer(h)
            total += ld
        z, ld_all = flow(x)
    torch.testing.assert_close(h, z)
    torch.testing.assert_close(ld_all, total)


def test_coupling_starts_as_identity():
    mask = alternating_mask(4, 0)
    layer = AffineCoupling(mask, MLP(4, 8, (16,), "relu")).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    z, ld = layer(x)
    assert torch.equal(z, x)
    assert torch.equal(ld, torch.zeros(5, dtype=torch.float64))


def test_coupling_keeps_conditioning_half_and_bounds_scale():
    mask = parity_mask(6, 0)
    layer = randomize_(AffineCoupling(mask, MLP(6, 12, (16,)), scale_bound=0.5).double(), 3, 5.0)
    x = torch.randn(10, 6, dtype=torch.float64)
    z, ld = layer(x)
    assert torch.equal(z[:, mask], x[:, mask])
    assert not torch.allclose(z[:, ~mask], x[:, ~mask])
    assert bool((ld.abs() <= 0.5 * (~mask).sum()).all())


def test_single_feature_coupling_is_elementwise_affine():
    # With one feature nothing is kept: the conditioner sees zeros, so the map is x*a + b with
    # the same a, b for every row.
    layer = randomize_(AffineCoupling(alternating_mask(1, 0), MLP(1, 2, (4,))).double(), 1)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).unsqueeze(1)
    z, ld = layer(x)
    slope = (z[1:] - z[:-1]) / (x[1:] - x[:-1])
    torch.testing.assert_close(slope, slope[:1].expand_as(slope))
    torch.testing.assert_close(ld, torch.log(slope[0]).expand(7))


def test_standardize_log_det():
    layer = Standardize(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 4.0]))
    z, ld = layer(torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(z, torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(ld, torch.log(torch.tensor([1 / 8])))


def test_masks_shapes_and_coverage():
    gen = torch.Generator().manual_seed(0)
    for kind in ("alternating", "checkerboard", "random"):
        m = coupling_masks(kind, 5, 4, gen)
        assert m.shape == (4, 5) and m.dtype == torch.bool
        assert int(m[0].sum()) == 2
    fixed = coupling_masks("fixed", 4, 3)
    assert bool((fixed == fixed[0]).all()) and not bool(fixed[:, 3].any())
    alt = coupling_masks("alternating", 4, 2)
    assert bool((alt[0] ^ alt[1]).all())


def test_random_masks_depend_only_on_generator():
    a = coupling_masks("random", 6, 5, torch.Generator().manual_seed(1))
    b = coupling_masks("random", 6, 5, torch.Generator().manual_seed(1))
    c = coupling_masks("random", 6, 5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 40), k=st.integers(1, 12), seed=seeds)
def test_permuted_masks_alternate_halves_of_permutations(d, k, seed):
    masks = coupling_masks("permuted", d, k, torch.Generator().manual_seed(seed))
    assert masks.shape == (k, d) and masks.dtype == torch.bool
    alt = coupling_masks("alternating", d, k)
    assert torch.equal(masks[:2], alt[:2])  # the first pair is the index-order halves
    for i in range(1, k):
        if i % 2:  # within a pair: complements, so the pair transforms every feature
            assert bool((masks[i] ^ masks[i - 1]).all())
        elif d > 1:  # across pairs: never the same kept set twice in a row
            assert not torch.equal(masks[i], masks[i - 1])
        assert int(masks[i].sum()) in (d // 2, d - d // 2)
    if d == 2:
        assert torch.equal(masks, alt)


def test_permuted_masks_depend_only_on_generator_and_do_permute():
    a = coupling_masks("permuted", 10, 8, torch.Generator().manual_seed(1))
    b = coupling_masks("permuted", 10, 8, torch.Generator().manual_seed(1))
    c = coupling_masks("permuted", 10, 8, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, coupling_masks("alternating", 10, 8))


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu", "elu", "gelu", "silu"])
@pytest.mark.parametrize("sizes", [(), (16,), (16, 8)])
@pytest.mark.parametrize("n_in", [3, 1])
def test_mlp_inference_path_matches_autograd_path_and_leaves_the_input(activation, sizes, n_in):
    # Without autograd MLP runs its activations in place, a one-input layer as addcmul and
    # the others as a product plus the bias in place; it must give the same numbers (to the
    # bit with MKL, whose kernels add the bias after the product either way) and never write
    # to the caller's tensor.
    torch.manual_seed(0)
    net = MLP(n_in, 4, sizes, activation)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(20, n_in)
    kept = x.clone()
    want = net(x).detach()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = net(x)
        if activation == "tanh" or n_in == 1:  # sigmoid-form tanh, fused multiply-add
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        elif torch.backends.mkl.is_available():
            assert torch.equal(got, want)
        else:  # another BLAS may add the bias at another point of the sum
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(x, kept)


@pytest.mark.parametrize("n_in", [1, 3])
@pytest.mark.parametrize("batch_shape", [(), (2, 5)])
def test_mlp_inference_path_takes_any_rank_like_linear(n_in, batch_shape):
    # nn.Linear maps the last dimension of a tensor of any rank; the no-grad shortcuts
    # (addcmul, product plus bias) are for matrices only. A single vector once came back as
    # a 1-row matrix, and a 3-D batch raised.
    torch.manual_seed(0)
    net = MLP(n_in, 4, (8, 6), "relu")
    for p in net.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(*batch_shape, n_in)
    want = net(x).detach()
    with torch.no_grad():
        got = net(x)
    assert got.shape == (*batch_shape, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("n_in", [1, 3])
@pytest.mark.parametrize("layer", [0, 1, 2, 3, 4])
def test_mlp_inference_shortcuts_keep_a_layers_hooks(n_in, layer):
    # The addcmul, product-plus-bias and in-place activation shortcuts bypass the module
    # call; with a hook on any layer they must not, and the hook's output is what the
    # network goes on with.
    torch.manual_seed(0)
    net = MLP(n_in, 2, (8, 6), "relu")
    for p in net.parameters():
        torch.nn.init.normal_(p)
    seen = []

    def hook(module, args, out):
        seen.append(out.shape)
        return out * 0

    net[layer].register_forward_hook(hook)
    with torch.no_grad():
        got = net(torch.randn(5, n_in))
    widths = {0: 8, 1: 8, 2: 6, 3: 6, 4: 2}
    assert seen == [torch.Size([5, widths[layer]])] and got.shape == (5, 2)
    if layer == 4:
        assert torch.equal(got, torch.zeros(5, 2))
    else:  # zero hidden units: the next layers give the bias path only
        rest = torch.zeros(5, widths[layer])
        for module in list(net)[layer + 1 :]:
            rest = module(rest)
        torch.testing.assert_close(got, rest.detach())


def test_mlp_one_input_shortcut_keeps_global_hooks():
    torch.manual_seed(0)
    net = MLP(1, 2, (8,), "relu")
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module)
    )
    try:
        with torch.no_grad():
            net(torch.randn(5, 1))
    finally:
        handle.remove()
    assert seen[0] is net[0]  # the one-input layer was called as a module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_tanh_is_tanh_to_rounding_and_in_place(dtype):
    x = torch.cat([
        torch.linspace(-30, 30, 20001, dtype=dtype),
        torch.tensor([0.0, -0.0], dtype=dtype),
        torch.logspace(-30, 0, 61, dtype=dtype),
    ])
    y = x.clone()
    out = tanh_(y)
    assert out is y
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, torch.tanh(x), rtol=0, atol=2 * eps)
    assert out.abs().max() <= 1 and torch.equal(out[x == 0], torch.zeros_like(out[x == 0]))
    assert torch.isnan(tanh_(torch.tensor([float("nan")], dtype=dtype))).all()
    # the 0-d constants it multiplies by give the bits of Python floats
    torch.testing.assert_close(
        tanh_(x.clone()), x.clone().mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0), rtol=0, atol=0
    )


@pytest.mark.parametrize("masked", [False, True])
def test_coupling_inference_matches_the_training_graph(masked):
    # Without autograd the log-scale bound runs in place with the CPU tanh of sknvp.nets; the
    # map and log-det must be those of the autograd path to rounding, and the input untouched.
    torch.manual_seed(0)
    mask = torch.tensor([True, False, True, False, False])
    if masked:
        layer = AffineCoupling(mask, MLP(5, 10, (16,), "relu"), scale_bound=1.5)
    else:
        layer = SplitAffineCoupling(mask, MLP(2, 6, (16,), "relu"), scale_bound=1.5)
    for p in layer.conditioner.parameters():
        torch.nn.init.normal_(p, std=2.0)  # raw log-scales well into the bound's saturation
    x = torch.randn(64, 5, dtype=torch.float64)
    layer = layer.double()
    kept = x.clone()
    z_grad, ld_grad = layer(x.requires_grad_(False))
    with torch.inference_mode():
        z, ld = layer(x)
        x_back, ld_back = layer.inverse(z)
    assert torch.equal(x, kept)
    torch.testing.assert_close(z, z_grad.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ld, ld_grad.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld_back, -ld, rtol=0, atol=1e-12)
    assert ld_grad.detach().abs().max() > 1.0  # the bound was exercised


@pytest.mark.parametrize("kind", ["alternating", "checkerboard", "permuted", "random"])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_flow_inference_matches_the_training_graph_and_leaves_its_input(kind, d):
    # Without autograd the standardisation, the couplings' exp and the log-scale bound run in
    # place on tensors the layers made themselves (runs of couplings, single couplings and the
    # masked coupling of one feature alike): the numbers of the autograd path to rounding,
    # and neither the caller's rows nor the latent rows given to the inverse are written to.
    flow = _flow(d, 4, kind, "relu", False, 2)
    for layer in flow.transform:
        if hasattr(layer, "conditioner"):
            torch.nn.init.normal_(layer.conditioner[-1].weight, std=2.0)  # saturate the bound
    x = _inputs(d, 3, n=33)
    x_kept = x.clone()
    z_grad, ld_grad = flow.transform(x.clone().requires_grad_(True))
    x_grad, back_grad = flow.transform.inverse(z_grad.detach().clone().requires_grad_(True))
    z_in = z_grad.detach().clone()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            z, ld = flow.transform(x)
            x_back, ld_back = flow.transform.inverse(z_in)
        assert torch.equal(x, x_kept)
        assert torch.equal(z_in, z_grad.detach())
        torch.testing.assert_close(z, z_grad.detach(), rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(ld, ld_grad.detach(), rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(x_back, x_grad.detach(), rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(ld_back, back_grad.detach(), rtol=ATOL, atol=ATOL)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)


def test_every_parameter_gets_a_gradient():
    flow = _flow(3, 3, "alternating", "elu", True, 0).train()
    flow.log_prob(_inputs(3, 0, n=32)).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_flow_sequential_empty_is_identity():
    seq = FlowSequential()
    x = torch.randn(3, 2)
    z, ld = seq(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(3))


def test_coupling_mask_broadcast_over_channels():
    # A (1, H, W) checkerboard mask shared by 3 channels: the conditioner's 6-channel output
    # must be masked per channel (this raised a shape error before the mask was expanded).
    torch.manual_seed(0)
    mask = (torch.arange(16).reshape(1, 4, 4) + torch.arange(4).reshape(1, 4, 1)) % 2 == 0
    conv = torch.nn.Conv2d(3, 6, 3, padding=1).double()
    layer = AffineCoupling(mask, conv, scale_bound=1.5)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    z, log_det = layer(x)
    kept = mask.expand(3, 4, 4)
    assert torch.equal(z[:, kept], x[:, kept])
    back, inv_log_det = layer.inverse(z)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(inv_log_det, -log_det)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, 3, 4, 4))[0], x[0])
    expected = torch.linalg.slogdet(jac.reshape(48, 48))[1]
    torch.testing.assert_close(log_det[0], expected)


def test_flow_sample_dtype_follows_parameters_not_a_bool_buffer():
    flow = build_realnvp(2, n_couplings=2, hidden_layer_sizes=(4,)).double()
    flow.register_buffer("aaa_flag", torch.tensor([True]))
    # Move the boolean buffer first in iteration order, as a coupling's mask may be.
    flow._buffers = {"aaa_flag": flow._buffers.pop("aaa_flag"), **flow._buffers}
    assert next(iter(flow.buffers())).dtype == torch.bool
    x = flow.sample(3, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64 and x.shape == (3, 2)


def test_coupling_pickled_without_float_masks_still_loads():
    # A coupling pickled before its floating mask buffers existed gets them back on load.
    import pickle

    torch.manual_seed(0)
    coupling = AffineCoupling(alternating_mask(4, 0), MLP(4, 8, (8,)), scale_bound=1.5)
    randomize_(coupling, seed=0)
    x = torch.randn(6, 4)
    expected = coupling(x)
    for name in ("_keep", "_free", "_free_bound"):
        del coupling._buffers[name]
    loaded = pickle.loads(pickle.dumps(coupling.double()))
    z, log_det = loaded(x.double())
    torch.testing.assert_close(z.float(), expected[0])
    torch.testing.assert_close(log_det.float(), expected[1])
    assert loaded._free_bound.dtype == torch.float64


@pytest.mark.parametrize(
    "mask", [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 1, 0, 0], [0, 1, 0, 0, 1]]
)
def test_split_coupling_equals_masked_coupling_with_the_same_weights(mask):
    # The split coupling is the masked one with the zero inputs and outputs cut away: with the
    # masked network's weights restricted to kept inputs / free outputs, both give one map.
    from sknvp.transforms import SplitAffineCoupling

    mask = torch.tensor(mask, dtype=torch.bool)
    d, kept, free = mask.numel(), torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
    masked = randomize_(AffineCoupling(mask, MLP(d, 2 * d, (8,)), 1.5).double(), 0, 1.0)
    split = SplitAffineCoupling(mask, MLP(len(kept), 2 * len(free), (8,)), 1.5).double()
    with torch.no_grad():
        first, last = masked.conditioner[0], masked.conditioner[-1]
        split.conditioner[0].weight.copy_(first.weight[:, kept])
        split.conditioner[0].bias.copy_(first.bias)
        rows = torch.cat([free, free + d])
        split.conditioner[-1].weight.copy_(last.weight[rows])
        split.conditioner[-1].bias.copy_(last.bias[rows])
    x = torch.randn(7, d, dtype=torch.float64)
    for a, b in zip(split(x), masked(x), strict=True):
        torch.testing.assert_close(a, b)
    z = masked(x)[0]
    for a, b in zip(split.inverse(z), masked.inverse(z), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(split.inverse(z)[0], x)


def test_split_coupling_rejects_masks_without_both_parts():
    from sknvp.transforms import SplitAffineCoupling

    for mask in ([1, 1], [0, 0], [[1, 0], [0, 1]]):
        with pytest.raises(ValueError, match="kept and transformed"):
            SplitAffineCoupling(torch.tensor(mask, dtype=torch.bool), MLP(1, 2, (4,)))


def test_vector_flows_use_split_couplings_where_possible():
    from sknvp.transforms import SplitAffineCoupling

    flow = build_realnvp(5, 4, (8,))
    couplings = [m for m in flow.modules() if isinstance(m, AffineCoupling)]
    assert all(isinstance(m, SplitAffineCoupling) for m in couplings)
    assert couplings[0].conditioner[0].in_features == 2  # only the kept features
    one = build_realnvp(1, 2, (8,))  # nothing to keep with a single feature
    assert not any(isinstance(m, SplitAffineCoupling) for m in one.modules())


def test_loading_a_state_dict_with_other_masks_refreshes_the_derived_buffers():
    # The floating masks and split indices are not in the state dict: loading masks of the
    # same shape must re-derive them, or the module would keep transforming the old features.
    x = torch.randn(9, 4, dtype=torch.float64)
    for kind in ("checkerboard", "random"):
        source = randomize_(build_realnvp(4, 3, (8,), mask=kind).double(), 1)
        target = build_realnvp(4, 3, (8,), mask="alternating").double()
        target.load_state_dict(source.state_dict())
        for a, b in zip(target(x), source(x), strict=True):
            torch.testing.assert_close(a, b)
    masked = randomize_(AffineCoupling(alternating_mask(4, 0), MLP(4, 8, (8,))).double(), 2)
    other = AffineCoupling(alternating_mask(4, 1), MLP(4, 8, (8,))).double()
    other.load_state_dict(masked.state_dict())
    for a, b in zip(other(x), masked(x), strict=True):
        torch.testing.assert_close(a, b)


def test_split_conditioners_start_at_the_scale_of_a_full_input_layer():
    # Fed only the kept half, torch's default init would draw the first layer from
    # U(+-1/sqrt(n_kept)); sknvp keeps U(+-1/sqrt(n_features)), which fitted small data better.
    torch.manual_seed(0)
    flow = build_realnvp(30, 2, (128,))
    for coupling in flow.transform:
        first = coupling.conditioner[0]
        assert first.in_features == 15
        bound = 1 / 30**0.5
        assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.9 * bound
        assert first.bias.abs().max() <= bound


def _one_by_one(flow, x, inverse=False):
    """The flow's map with every layer called on its own (the reference for the runs)."""
    layers = list(flow.transform)
    log_det = None
    for layer in reversed(layers) if inverse else layers:
        x, ld = layer.inverse(x) if inverse else layer(x)
        log_det = ld if log_det is None else log_det + ld
    return x, log_det


@pytest.mark.parametrize("kind", ["alternating", "checkerboard", "permuted", "random"])
@pytest.mark.parametrize("d", [2, 5, 8])
def test_runs_of_couplings_compute_what_the_layers_compute_one_by_one(kind, d, monkeypatch):
    # FlowSequential applies consecutive couplings that split into the same two index sets
    # to the two parts (one split and one join per run): the same numbers as layer by layer,
    # forward and inverse, with and without autograd. (Parts on rows, as here, are the same
    # to the bit; the transposed parts of inference are checked in the next test.)
    monkeypatch.setattr(transforms, "COLUMNS_MAX_WIDTH", 0)
    flow = _flow(d, 6, kind, "relu", False, 3)
    runs = [item for item in flow.transform._plan() if type(item).__name__ == "_CouplingRun"]
    expected_runs = {"alternating": 1, "checkerboard": 1, "permuted": 1 if d == 2 else 3}
    if kind in expected_runs:
        assert len(runs) == expected_runs[kind]
        assert sum(len(r.layers) for r in runs) == 6
    x = _inputs(d, 0, n=11)
    for inverse in (False, True):
        with torch.no_grad():
            want = _one_by_one(flow, x, inverse)
            got = flow.transform.inverse(x) if inverse else flow.transform(x)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    xg = x.clone().requires_grad_(True)
    flow.transform(xg)[1].sum().backward()
    xr = x.clone().requires_grad_(True)
    _one_by_one(flow, xr)[1].sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-12, atol=1e-12)


def _column_calls(monkeypatch) -> list:
    calls = []
    split = transforms._CouplingRun._split_columns

    def spy(run, x):
        calls.append(run)
        return split(run, x)

    monkeypatch.setattr(transforms._CouplingRun, "_split_columns", spy)
    return calls


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "elu"])
@pytest.mark.parametrize(
    ("kind", "d"),
    [
        ("alternating", 4), ("checkerboard", 5), ("permuted", 9), ("alternating", 32),
        ("permuted", 40),
    ],
)
@pytest.mark.parametrize("clip", [False, True])
def test_inference_on_transposed_parts_computes_what_the_parts_on_rows_do(
    kind, d, act, clip, monkeypatch
):
    # Without autograd on CPU, runs whose parts have 2 to COLUMNS_MAX_WIDTH features work on
    # the parts transposed (features by rows): the same map and log-determinant to rounding,
    # forward and inverse, clipped conditioner inputs included; the input is left alone.
    flow = _flow(d, 6, kind, act, False, 4)
    if clip:
        for layer in flow.transform:
            if isinstance(layer, SplitAffineCoupling):
                n = len(layer._kept_idx)
                layer.set_input_range(-torch.rand(n) - 0.2, torch.rand(n) + 0.2)
    x = _inputs(d, 2, n=37)
    x_before = x.clone()
    calls = _column_calls(monkeypatch)
    with torch.no_grad():
        got = [flow.transform(x), flow.transform.inverse(x)]
    runs = [i for i in flow.transform._plan() if type(i).__name__ == "_CouplingRun"]
    widths = [sorted((len(r.left), len(r.right))) for r in runs]
    narrow = [w for w in widths if w[0] >= 2 and w[1] <= transforms.COLUMNS_MAX_WIDTH]
    assert len(calls) == 2 * len(narrow) and bool(narrow) == (d <= 32)  # 40: parts of 20
    assert torch.equal(x, x_before)
    monkeypatch.setattr(transforms, "COLUMNS_MAX_WIDTH", 0)
    with torch.no_grad():
        want = [flow.transform(x), flow.transform.inverse(x)]
    # The two layouts sum each matmul in another order; six layers of exp(-s) amplify the
    # rounding of the inverse to 5e-12 relative on an AVX2 host (outputs of 4e4): 1e-10.
    for (a, la), (b, lb) in zip(got, want, strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)


def test_transposed_parts_are_left_to_autograd_hooks_and_other_networks(monkeypatch):
    # The transposed path is for inference with plain MLP conditioners only: autograd, a
    # hook on a conditioner's layer and an activation without an in-place form (GELU) keep
    # the layers' own calls.
    calls = _column_calls(monkeypatch)
    flow = _flow(6, 4, "alternating", "relu", False, 0)
    x = _inputs(6, 0)
    flow.transform(x)  # autograd on
    assert calls == []
    seen = []
    layer = flow.transform[1].conditioner[0]
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(m))
    with torch.no_grad():
        flow.transform(x)
    handle.remove()
    assert calls == [] and seen == [layer]
    with torch.no_grad():
        flow.transform(x)
    assert len(calls) == 1
    gelu = _flow(6, 4, "alternating", "gelu", False, 0)
    with torch.no_grad():
        gelu.transform(x)
    assert len(calls) == 1


def test_runs_respect_hooks_and_are_rebuilt_after_changes():
    flow = _flow(6, 4, "checkerboard", "relu", False, 0)
    x = _inputs(6, 0)
    seen = []
    handle = flow.transform[2].register_forward_hook(lambda m, args, out: seen.append(m))
    with torch.no_grad():
        flow(x)
    handle.remove()
    assert seen == [flow.transform[2]]  # a hooked layer is called as a module
    # Loading other masks re-derives the index buffers: the plan must follow them.
    before = flow.transform._plan()
    source = randomize_(build_realnvp(6, 4, (8, 8), mask="alternating").double(), 1)
    assert before[1].boundary is None  # even/odd: gathers
    plain = build_realnvp(6, 4, (8, 8), mask="checkerboard").double()
    plain.load_state_dict(source.state_dict())  # halves now: one block split
    run = next(i for i in plain.transform._plan() if type(i).__name__ == "_CouplingRun")
    assert run.boundary == 3
    with torch.no_grad():
        for a, b in zip(plain(x), source(x), strict=True):
            torch.testing.assert_close(a, b)


def test_flow_sequential_pickles_and_copies_without_its_plan():
    import copy
    import pickle

    flow = _flow(5, 4, "permuted", "relu", False, 2)
    x = _inputs(5, 0)
    with torch.no_grad():
        want = flow(x)
        assert "_plan_cache" in vars(flow.transform)
        for other in (pickle.loads(pickle.dumps(flow)), copy.deepcopy(flow)):
            assert "_plan_cache" not in vars(other.transform)
            for a, b in zip(other(x), want, strict=True):
                assert torch.equal(a, b)
