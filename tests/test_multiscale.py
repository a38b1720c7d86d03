"""Property tests of the multi-scale image layers: exact inverses, log-determinants equal to
autograd's, and a latent of the image's size (float64, evaluation mode)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import randomize_, seeds

from sknvp.multiscale import (
    FactorOut,
    Flatten,
    LogitTransform,
    MultiScaleRealNVPFlow,
    ResNetConditioner,
    Squeeze,
    auto_n_scales,
    build_multiscale,
    channel_coupling,
    check_n_scales,
    checkerboard_coupling,
)
from sknvp.transforms import BatchNormFlow, FlowSequential

ATOL = 1e-9
SMALL_SHAPES = [(1, 4, 4), (3, 4, 4)]
channels = st.integers(1, 3)
even_sides = st.sampled_from([2, 4, 6])


def _images(shape, seed, n=4, low=-2.0, high=2.0):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.rand(n, *shape, generator=gen, dtype=torch.float64) * (high - low) + low


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions run far faster on one thread when other jobs share the CPU."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


def _sorted(x):
    return x.reshape(len(x), -1).sort(1).values


def _net(c_in, c_out):
    return ResNetConditioner(c_in, c_out, n_channels=4, n_blocks=1)


def _check_inverse(layer, x):
    z, log_det = layer(x)
    x_back, log_det_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, atol=ATOL, rtol=0)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros_like(log_det), atol=ATOL, rtol=0)
    return z, log_det


def _autograd_log_det(layer, x_one):
    def flat_map(v):
        return layer(v.reshape(1, *x_one.shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(flat_map, x_one.reshape(-1))
    assert jac.shape[0] == jac.shape[1], "the layer must keep the number of values"
    return torch.linalg.slogdet(jac)[1]


def _check_log_det(layer, x):
    _, log_det = layer(x)
    for i in range(len(x)):
        expected = _autograd_log_det(layer, x[i])
        torch.testing.assert_close(log_det[i], expected, atol=1e-7, rtol=1e-9)


# ------------------------------------------------------------------- squeeze


@settings(max_examples=20)
@given(c=channels, h=even_sides, w=even_sides, seed=seeds)
def test_squeeze_roundtrip_and_shape(c, h, w, seed):
    x = _images((c, h, w), seed)
    z, log_det = _check_inverse(Squeeze(), x)
    assert z.shape == (len(x), 4 * c, h // 2, w // 2)
    assert torch.equal(log_det, torch.zeros(len(x), dtype=x.dtype))
    assert torch.equal(_sorted(z), _sorted(x))  # a permutation of the pixels


def test_squeeze_puts_each_2x2_block_into_channels():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    # top-left block [[0, 1], [4, 5]] becomes channels 0..3 at position (0, 0)
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert z[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


# ----------------------------------------------------------------- couplings


@settings(max_examples=10)
@given(shape=st.sampled_from(SMALL_SHAPES), parity=st.integers(0, 1), seed=seeds)
def test_checkerboard_coupling_inverse_and_log_det(shape, parity, seed):
    layer = randomize_(checkerboard_coupling(shape, parity, _net).double(), seed).eval()
    x = _images(shape, seed)
    z, _ = _check_inverse(layer, x)
    _check_log_det(layer, x[:2])
    kept = layer.mask.expand_as(x)
    assert torch.equal(z[kept], x[kept])  # the checkerboard half passes unchanged
    assert not torch.allclose(z[~kept], x[~kept])


@settings(max_examples=10)
@given(
    shape=st.sampled_from([(2, 2, 2), (4, 2, 2), (12, 2, 2)]), parity=st.integers(0, 1), seed=seeds
)
def test_channel_coupling_inverse_and_log_det(shape, parity, seed):
    layer = randomize_(channel_coupling(shape, parity, _net).double(), seed).eval()
    x = _images(shape, seed)
    z, _ = _check_inverse(layer, x)
    _check_log_det(layer, x[:2])
    c = shape[0]
    kept = slice(0, c // 2) if parity == 0 else slice(c // 2, c)
    assert torch.equal(z[:, kept], x[:, kept])


def test_couplings_start_as_identity():
    for make in (checkerboard_coupling, channel_coupling):
        layer = make((4, 2, 2), 0, _net).double().eval()
        x = _images((4, 2, 2), 0)
        z, log_det = layer(x)
        assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(len(x), dtype=x.dtype))


def test_conditioner_scale_is_bounded_by_learned_factor():
    net = randomize_(ResNetConditioner(2, 4, n_channels=4, n_blocks=2).double(), 3).eval()
    with torch.no_grad():
        net.scale_factor.fill_(0.25)
    out = net(_images((2, 4, 4), 0, low=-50, high=50))
    assert out.shape == (4, 4, 4, 4)
    assert out[:, :2].abs().max() <= 0.25
    with pytest.raises(ValueError, match="out_channels must be even"):
        ResNetConditioner(2, 3)


# ---------------------------------------------------------- batch norm, logit


@settings(max_examples=10)
@given(shape=st.sampled_from(SMALL_SHAPES), seed=seeds)
def test_batch_norm_on_images_inverse_and_log_det(shape, seed):
    layer = randomize_(BatchNormFlow(shape[0]).double(), seed).eval()
    x = _images(shape, seed)
    _check_inverse(layer, x)
    _check_log_det(layer, x[:2])


@settings(max_examples=10)
@given(
    shape=st.sampled_from(SMALL_SHAPES),
    levels=st.sampled_from([2, 17, 256]),
    alpha=st.sampled_from([0.0, 0.05, 0.3]),
    seed=seeds,
)
def test_logit_transform_inverse_and_log_det(shape, levels, alpha, seed):
    layer = LogitTransform(levels, alpha)
    x = _images(shape, seed, low=0.01 * levels, high=0.99 * levels)
    _check_inverse(layer, x)
    _check_log_det(layer, x[:2])


def test_logit_transform_matches_hand_computation():
    layer = LogitTransform(17, 0.05)
    x = torch.tensor([[8.5]], dtype=torch.float64)  # p = 0.05 + 0.9 * 0.5 = 0.5
    y, log_det = layer(x)
    assert y.item() == pytest.approx(0.0, abs=1e-15)
    assert log_det.item() == pytest.approx(math.log(0.9 / 17) - 2 * math.log(0.5), abs=1e-12)


def test_logit_transform_support():
    layer = LogitTransform(10, 0.05)
    edge = 0.05 * 10 / 0.9  # p reaches 0 at x = -alpha L / (1 - 2 alpha)
    x = torch.tensor([[0.0, 10.0], [-0.99 * edge, 10 + 0.99 * edge], [-1.01 * edge, 5.0]])
    assert layer.in_support(x).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(10, 0.5)


# ------------------------------------------------------------- factor-out


def test_factor_out_keeps_latent_size_and_inverts():
    shape = (4, 2, 2)
    layer = FactorOut(shape, FlowSequential(Flatten((2, 2, 2))))
    x = _images(shape, 0)
    z, log_det = _check_inverse(layer, x)
    assert z.shape == (len(x), 16)
    torch.testing.assert_close(z[:, :8], x[:, :2].reshape(len(x), -1))
    assert torch.equal(log_det, torch.zeros(len(x), dtype=x.dtype))


# ------------------------------------------------------------ whole stack


def _stack(shape, n_scales, seed, batch_norm=True, n_levels=None):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = build_multiscale(
            shape, n_scales, n_blocks=1, n_channels=4, batch_norm=batch_norm, n_levels=n_levels
        )
    return randomize_(flow.double(), seed, scale=0.2).eval()


@settings(max_examples=8)
@given(
    shape=st.sampled_from(SMALL_SHAPES),
    n_scales=st.integers(1, 2),
    batch_norm=st.booleans(),
    seed=seeds,
)
def test_multiscale_stack_inverse_and_log_det(shape, n_scales, batch_norm, seed):
    flow = _stack(shape, n_scales, seed, batch_norm)
    x = _images(shape, seed)
    z, _ = _check_inverse(flow, x)
    assert z.shape == x.shape
    _check_log_det(flow, x[:2])


@settings(max_examples=5)
@given(shape=st.sampled_from(SMALL_SHAPES), seed=seeds)
def test_multiscale_stack_with_logit_inverse_and_log_det(shape, seed):
    flow = _stack(shape, 2, seed, n_levels=17)
    x = _images(shape, seed, low=0.0, high=17.0)
    _check_inverse(flow, x)
    _check_log_det(flow, x[:2])


@pytest.mark.parametrize(
    "shape, n_scales", [((1, 8, 8), 2), ((1, 8, 8), 3), ((3, 8, 8), 3), ((2, 4, 8), 2)]
)
def test_latent_size_equals_data_size(shape, n_scales):
    flow = _stack(shape, n_scales, 0)
    x = _images(shape, 0)
    z, _ = _check_inverse(flow, x)
    assert z.shape == x.shape
    z_flat, _ = flow(x.reshape(len(x), -1))
    assert z_flat.shape == (len(x), math.prod(shape))
    torch.testing.assert_close(z_flat, z.reshape(len(x), -1), atol=ATOL, rtol=0)


def test_log_prob_is_normal_plus_log_det_and_minus_inf_outside_support():
    flow = _stack((1, 4, 4), 2, 1, n_levels=17)
    x = _images((1, 4, 4), 1, low=0.0, high=17.0)
    z, log_det = flow(x)
    expected = -0.5 * (z**2).sum((1, 2, 3)) - 8 * math.log(2 * math.pi) + log_det
    torch.testing.assert_close(flow.log_prob(x), expected)
    x[0, 0, 0, 0] = -5.0  # far below the logit's domain
    log_p = flow.log_prob(x)
    assert log_p[0] == -math.inf and torch.isfinite(log_p[1:]).all()


def test_sample_shape_dtype_and_temperature():
    flow = _stack((3, 4, 4), 2, 2, n_levels=256)
    gen = torch.Generator().manual_seed(0)
    x = flow.sample(5, gen)
    assert x.shape == (5, 3, 4, 4) and x.dtype == torch.float64
    cold = flow.sample(5, torch.Generator().manual_seed(0), temperature=1e-8)
    mode = flow.inverse(torch.zeros(1, 3, 4, 4, dtype=torch.float64))[0]
    torch.testing.assert_close(cold, mode.expand_as(cold), atol=1e-5, rtol=0)
    edge = 0.05 * 256 / 0.9
    assert ((x > -edge) & (x < 256 + edge)).all()  # inside the logit transform's domain


def test_fresh_stack_is_volume_preserving_without_preprocessing():
    flow = (
        build_multiscale((1, 8, 8), 2, n_blocks=1, n_channels=4, batch_norm=False, n_levels=None)
        .double()
        .eval()
    )
    x = _images((1, 8, 8), 0)
    z, log_det = flow(x)
    assert torch.equal(log_det, torch.zeros(len(x), dtype=x.dtype))
    assert torch.equal(_sorted(z), _sorted(x))  # only a reordering


def test_every_parameter_gets_a_gradient():
    flow = _stack((1, 8, 8), 2, 0, n_levels=17).train()
    flow.log_prob(_images((1, 8, 8), 0, low=0, high=17)).mean().backward()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_structure_follows_the_paper():
    flow = build_multiscale((1, 8, 8), 2, n_blocks=2, n_channels=8, n_levels=17)
    assert isinstance(flow, MultiScaleRealNVPFlow)
    names = [type(m).__name__ for m in flow.transform[1]]
    assert names == ["AffineCoupling", "BatchNormFlow"] * 3 + ["Squeeze"] + [
        "AffineCoupling",
        "BatchNormFlow",
    ] * 3 + ["FactorOut"]
    last = flow.transform[1][-1].rest
    assert [type(m).__name__ for m in last].count("AffineCoupling") == 4
    assert last[0].mask.shape == (2, 4, 4)  # 4 channels after squeeze, half factored out
    widths = [m.head.out_channels for m in flow.modules() if isinstance(m, ResNetConditioner)]
    assert widths == [8] * 6 + [16] * 4  # feature maps double at the coarser scale


def test_n_scales_rules():
    assert auto_n_scales((1, 8, 8)) == 2
    assert auto_n_scales((3, 32, 32)) == 4
    assert auto_n_scales((1, 28, 28)) == 3
    assert auto_n_scales((1, 4, 4)) == 1
    assert check_n_scales((1, 8, 8), 3) == 3
    with pytest.raises(ValueError, match="n_scales=4 does not fit"):
        check_n_scales((1, 8, 8), 4)
    with pytest.raises(ValueError, match="n_scales <= 2"):
        check_n_scales((1, 6, 6), 3)
    with pytest.raises(ValueError, match="image_shape"):
        build_multiscale((8, 8))
