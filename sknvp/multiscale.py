r"""Multi-scale Real-NVP for images (Dinh et al., 2016, sections 3.3-3.7 and 4.1).

Every layer maps ``(batch, channels, height, width)`` tensors and has ``forward(x) -> (z,
log_det)`` (data towards the latent space) and ``inverse(z) -> (x, log_det)``, with ``log_det``
of shape ``(batch,)``, like :mod:`sknvp.transforms`. :func:`build_multiscale` assembles the
paper's architecture; per scale

    3 checkerboard couplings -> squeeze -> 3 channel couplings -> factor out half the channels

and 4 checkerboard couplings at the last scale, preceded by the paper's logit preprocessing. The
latent has as many numbers as the image: every factored-out part is kept, flattened and
concatenated, and :class:`MultiScaleRealNVPFlow` returns it in the shape of its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .flows import RealNVPFlow, standard_normal_log_prob
from .masks import channel_mask, checkerboard_mask
from .nets import make_activation
from .transforms import AffineCoupling, BatchNormFlow, FlowSequential

__all__ = [
    "FactorOut",
    "Flatten",
    "LogitTransform",
    "MultiScaleRealNVPFlow",
    "ResNetConditioner",
    "Squeeze",
    "auto_n_scales",
    "build_multiscale",
    "channel_coupling",
    "check_n_scales",
    "checkerboard_coupling",
]

ConditionerFactory = Callable[[int, int], nn.Module]


class Squeeze(nn.Module):
    r"""Trade space for channels: ``(c, h, w) -> (4c, h/2, w/2)`` (paper, figure 3).

    Each 2x2 block of pixels becomes four channels; output channel ``4k + 2a + b`` holds the
    pixel at offset ``(a, b)`` of input channel ``k``. A permutation, so ``log_det`` is 0.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got {h}x{w}.")
        y = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(n, 4 * c, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = z.shape
        x = z.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c // 4, 2 * h, 2 * w), z.new_zeros(n)


class Flatten(nn.Module):
    """``(batch, *shape) -> (batch, prod(shape))``; the inverse restores ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.reshape(z.shape[0], *self.shape), z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class FactorOut(nn.Module):
    r"""Send the first half of the channels to the latent, and the rest through ``rest``.

    Parameters
    ----------
    shape : tuple of int
        ``(c, h, w)`` of the input.
    rest : nn.Module
        Invertible map from ``(batch, c - c // 2, h, w)`` to a flat latent ``(batch, d)``.

    ``forward`` returns the flat latent ``[first half flattened, rest(second half)]``, of size
    ``c * h * w`` when ``rest`` keeps the size; ``log_det`` is that of ``rest``.
    """

    def __init__(self, shape: Sequence[int], rest: nn.Module) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.n_out = self.shape[0] // 2
        self.rest = rest

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z_rest, log_det = self.rest(x[:, self.n_out :])
        return torch.cat([x[:, : self.n_out].reshape(x.shape[0], -1), z_rest], 1), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        _, h, w = self.shape
        n_first = self.n_out * h * w
        x_rest, log_det = self.rest.inverse(z[:, n_first:])
        x_out = z[:, :n_first].reshape(z.shape[0], self.n_out, h, w)
        return torch.cat([x_out, x_rest], 1), log_det

    def extra_repr(self) -> str:
        return f"shape={self.shape}, n_out={self.n_out}"


class LogitTransform(nn.Module):
    r"""The paper's preprocessing of pixel levels, :math:`x \in [0, L]`, as an invertible layer.

    .. math::
        p = \alpha + (1 - 2\alpha)\,\frac{x}{L}, \qquad y = \log p - \log(1 - p),

        \log\left|\det \frac{\partial y}{\partial x}\right|
        = \sum_j \left[\log\frac{1 - 2\alpha}{L} - \log p_j - \log(1 - p_j)\right].

    The map is defined where :math:`0 < p < 1`, i.e. on
    :math:`x \in (-\alpha L / (1-2\alpha),\ L + \alpha L / (1 - 2\alpha))`; :meth:`in_support`
    tells which samples lie there (a flow's density is zero elsewhere).

    Parameters
    ----------
    n_levels : float
        :math:`L`, the number of pixel levels (256 for 8-bit images).
    alpha : float, default=0.05
        Squeezes :math:`x / L` into :math:`[\alpha, 1 - \alpha]` so the logit stays finite.
    """

    def __init__(self, n_levels: float, alpha: float = 0.05) -> None:
        super().__init__()
        if not n_levels > 0:
            raise ValueError(f"n_levels must be positive, got {n_levels}.")
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}.")
        self.n_levels = float(n_levels)
        self.alpha = float(alpha)
        self._log_slope = math.log((1 - 2 * self.alpha) / self.n_levels)

    def _p(self, x: Tensor) -> Tensor:
        return self.alpha + (1 - 2 * self.alpha) * x / self.n_levels

    def in_support(self, x: Tensor) -> Tensor:
        """Boolean ``(batch,)``: whether every pixel of the sample is inside the domain."""
        p = self._p(x).reshape(x.shape[0], -1)
        return ((p > 0) & (p < 1)).all(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self._p(x)
        log_p, log_q = torch.log(p), torch.log1p(-p)
        per_pixel = self._log_slope - log_p - log_q
        return log_p - log_q, per_pixel.reshape(x.shape[0], -1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = (torch.sigmoid(z) - self.alpha) * (self.n_levels / (1 - 2 * self.alpha))
        per_pixel = F.logsigmoid(z) + F.logsigmoid(-z) - self._log_slope
        return x, per_pixel.reshape(z.shape[0], -1).sum(1)

    def extra_repr(self) -> str:
        return f"n_levels={self.n_levels:g}, alpha={self.alpha:g}"


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, activation: str | Callable[[], nn.Module]) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(width),
            make_activation(activation),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            make_activation(activation),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ResNetConditioner(nn.Module):
    r"""Convolutional residual network giving a coupling's log-scale and shift.

    ``3x3 conv -> n_blocks x [BN, act, 3x3 conv, BN, act, 3x3 conv] + skip -> BN, act, 3x3
    conv``. The last convolution starts at zero, so a coupling starts as the identity. The
    output's first half is the log-scale, returned as :math:`\gamma_c \tanh(\cdot)` with a
    learned per-channel factor :math:`\gamma_c` (initially 1), as in the paper; the second half
    is the shift.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out (``out_channels`` even: log-scale and shift).
    n_channels : int, default=64
        Width (feature maps) of the hidden convolutions.
    n_blocks : int, default=4
        Number of residual blocks.
    activation : str or callable, default="relu"
        See :data:`sknvp.nets.ACTIVATIONS`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_channels: int = 64,
        n_blocks: int = 4,
        activation: str | Callable[[], nn.Module] = "relu",
    ) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels must be even, got {out_channels}.")
        self.head = nn.Conv2d(in_channels, n_channels, 3, padding=1)
        self.blocks = nn.Sequential(
            *[_ResidualBlock(n_channels, activation) for _ in range(n_blocks)]
        )
        self.tail = nn.Sequential(
            nn.BatchNorm2d(n_channels),
            make_activation(activation),
            nn.Conv2d(n_channels, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.tail[-1].weight)
        nn.init.zeros_(self.tail[-1].bias)
        self.scale_factor = nn.Parameter(torch.ones(out_channels // 2, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        raw_s, t = self.tail(self.blocks(self.head(x))).chunk(2, dim=1)
        return torch.cat([self.scale_factor * torch.tanh(raw_s), t], 1)


def checkerboard_coupling(
    shape: Sequence[int],
    parity: int,
    make_conditioner: ConditionerFactory,
    scale_bound: float = 2.0,
) -> AffineCoupling:
    """Affine coupling on ``(c, h, w)`` images that keeps a spatial checkerboard.

    The mask has shape ``(c, h, w)``, the same checkerboard in every channel; see
    :func:`sknvp.masks.checkerboard_mask` for ``parity``.
    """
    c, h, w = shape
    mask = checkerboard_mask(h, w, parity).expand(c, h, w).clone()
    return AffineCoupling(mask, make_conditioner(c, 2 * c), scale_bound)


def channel_coupling(
    shape: Sequence[int],
    parity: int,
    make_conditioner: ConditionerFactory,
    scale_bound: float = 2.0,
) -> AffineCoupling:
    """Affine coupling on ``(c, h, w)`` images that keeps half of the channels.

    The mask has shape ``(c, 1, 1)``: the first half of the channels is kept for ``parity`` 0,
    the second half for parity 1.
    """
    c = shape[0]
    mask = channel_mask(c, parity).reshape(c, 1, 1)
    return AffineCoupling(mask, make_conditioner(c, 2 * c), scale_bound)


def check_n_scales(image_shape: Sequence[int], n_scales: int) -> int:
    """Check that ``n_scales`` scales fit an image of shape ``(c, h, w)``; return it.

    Each of the ``n_scales - 1`` squeezes halves the height and width, so both must be
    divisible by ``2 ** (n_scales - 1)``, and the last scale needs at least two pixels for its
    checkerboard.
    """
    _, h, w = image_shape
    factor = 2 ** (n_scales - 1)
    if n_scales < 1 or h % factor or w % factor or (h // factor) * (w // factor) < 2:
        raise ValueError(
            f"n_scales={n_scales} does not fit images of height x width = {h}x{w}: each of "
            "the n_scales - 1 squeezes halves both (they must stay integers) and the last "
            f"scale needs at least 2 pixels. Use n_scales <= {_max_n_scales(h, w)}."
        )
    return int(n_scales)


def _max_n_scales(h: int, w: int) -> int:
    n = 1
    while h % 2**n == 0 and w % 2**n == 0 and (h // 2**n) * (w // 2**n) >= 2:
        n += 1
    return n


def auto_n_scales(image_shape: Sequence[int]) -> int:
    """The paper's rule: squeeze while the next scale stays at least 4x4 (and divisible).

    8x8 digits get 2 scales (8x8, then 4x4), 32x32 images 4 (down to 4x4). Images smaller
    than 4x4 get one scale.
    """
    _, h, w = image_shape
    n = 1
    while h % 2**n == 0 and w % 2**n == 0 and min(h, w) // 2**n >= 4:
        n += 1
    return n


class MultiScaleRealNVPFlow(RealNVPFlow):
    r"""A multi-scale image flow with a standard normal latent of the image's size.

    Accepts images ``(batch, c, h, w)`` or flattened rows ``(batch, c*h*w)``; ``forward``
    returns the latent in the shape of its input, and ``inverse`` data in the shape of its
    input. :meth:`log_prob` is :math:`-\infty` outside the preprocessing's domain.

    Parameters
    ----------
    transform : FlowSequential
        Maps ``(batch, c, h, w)`` images to a flat latent ``(batch, c*h*w)``.
    event_shape : tuple of int
        ``(c, h, w)``.
    """

    def _support(self, x: Tensor) -> Tensor | None:
        first = self.transform[0] if len(self.transform) else None
        return first.in_support(x) if isinstance(first, LogitTransform) else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map data (images or rows) to the latent, in the input's shape."""
        z, log_det = self.transform(x.reshape(x.shape[0], *self.event_shape))
        return z.reshape(x.shape), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map latent points (images or rows) to data, in the input's shape."""
        x, log_det = self.transform.inverse(z.reshape(z.shape[0], -1))
        return x.reshape(z.shape), log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of each sample, shape ``(batch,)``."""
        z, log_det = self.forward(x)
        log_p = standard_normal_log_prob(z) + log_det
        inside = self._support(x.reshape(x.shape[0], *self.event_shape))
        return log_p if inside is None else torch.where(inside, log_p, -math.inf)

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> Tensor:
        """Draw ``n`` images ``(n, c, h, w)``; the latent's standard deviation is
        ``temperature``."""
        ref = next(self.parameters())
        z = torch.randn(
            (n, *self.event_shape), generator=generator, device=ref.device, dtype=ref.dtype
        )
        return self.inverse(z * temperature)[0]


def _coupling_block(kind, shape, parities, make_net, scale_bound, batch_norm) -> list:
    layers: list[nn.Module] = []
    for parity in parities:
        layers.append(kind(shape, parity, make_net, scale_bound))
        if batch_norm:
            layers.append(BatchNormFlow(shape[0]))
    return layers


def _build_scale(shape, n_left, width, options) -> FlowSequential:
    def make_net(c_in: int, c_out: int) -> nn.Module:
        return ResNetConditioner(c_in, c_out, width, options["n_blocks"], options["activation"])

    common = (make_net, options["scale_bound"], options["batch_norm"])
    if n_left == 1:
        return FlowSequential(
            *_coupling_block(checkerboard_coupling, shape, (0, 1, 0, 1), *common), Flatten(shape)
        )
    c, h, w = shape
    squeezed = (4 * c, h // 2, w // 2)
    rest = _build_scale((4 * c - 2 * c, h // 2, w // 2), n_left - 1, 2 * width, options)
    return FlowSequential(
        *_coupling_block(checkerboard_coupling, shape, (0, 1, 0), *common),
        Squeeze(),
        *_coupling_block(channel_coupling, squeezed, (0, 1, 0), *common),
        FactorOut(squeezed, rest),
    )


def build_multiscale(
    image_shape: Sequence[int],
    n_scales: int | str = "auto",
    n_blocks: int = 4,
    n_channels: int = 64,
    activation: str | Callable[[], nn.Module] = "relu",
    batch_norm: bool = True,
    scale_bound: float = 2.0,
    n_levels: float | None = 256,
    alpha: float = 0.05,
) -> MultiScaleRealNVPFlow:
    """Build the Real-NVP paper's multi-scale image flow.

    Parameters
    ----------
    image_shape : tuple of int
        ``(channels, height, width)``.
    n_scales : int or "auto", default="auto"
        Number of scales (checked by :func:`check_n_scales`); ``"auto"`` follows
        :func:`auto_n_scales`.
    n_blocks : int, default=4
        Residual blocks per conditioner.
    n_channels : int, default=64
        Conditioner width at the first scale; it doubles at each coarser scale.
    activation : str or callable, default="relu"
        Conditioner activation.
    batch_norm : bool, default=True
        Put a :class:`~sknvp.transforms.BatchNormFlow` after every coupling.
    scale_bound : float, default=2.0
        Soft bound on each coupling's log-scale (see :class:`~sknvp.transforms.AffineCoupling`).
    n_levels : float or None, default=256
        If given, a :class:`LogitTransform` with this many levels and ``alpha`` comes first,
        and the flow models pixel levels in ``[0, n_levels]``.
    alpha : float, default=0.05
        The logit transform's :math:`\\alpha`.

    Returns
    -------
    MultiScaleRealNVPFlow
        Parameters in the default dtype; weights drawn from the global RNG (fork it to seed).
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"Expected image_shape (channels, height, width), got {image_shape}.")
    n = auto_n_scales(shape) if n_scales == "auto" else check_n_scales(shape, int(n_scales))
    if n == 1:
        check_n_scales(shape, 1)
    options = {
        "n_blocks": n_blocks,
        "activation": activation,
        "scale_bound": scale_bound,
        "batch_norm": batch_norm,
    }
    body = _build_scale(shape, n, int(n_channels), options)
    pre = [] if n_levels is None else [LogitTransform(n_levels, alpha)]
    return MultiScaleRealNVPFlow(FlowSequential(*pre, body), shape)
