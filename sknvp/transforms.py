r"""Invertible layers with log-determinants.

Every layer is an ``nn.Module`` with ``forward(x) -> (z, log_det)`` (data towards the latent
space, ``log_det = log|det dz/dx|`` per sample) and ``inverse(z) -> (x, log_det)`` (latent
towards data, ``log_det = log|det dx/dz|``). Shapes are ``(batch, n_features)`` for vectors and
``(batch, channels, height, width)`` for images; ``log_det`` has shape ``(batch,)``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .nets import MLP, constant_like

__all__ = [
    "AffineCoupling",
    "BatchNormFlow",
    "FlowSequential",
    "SplitAffineCoupling",
    "Standardize",
    "TriangularWhitening",
]


_RANGE_BUFFERS = ("input_low", "input_high")


def _sum_except_batch(x: Tensor) -> Tensor:
    return x.sum(dim=tuple(range(1, x.dim())))


def _bounded_log_scale(raw_s: Tensor, bound: float) -> Tensor:
    r""":math:`\beta \tanh(\tilde s / \beta)`. Without autograd, a fresh tensor computed in
    place; on CPU as :math:`2\beta\,\sigma(2\tilde s / \beta) - \beta` (the sigmoid form of
    :func:`~sknvp.nets.tanh_` with the bound folded in: four passes over the tensor instead of
    six; inference spent a sixth of its time in ``tanh`` at 50-D)."""
    if torch.is_grad_enabled():
        return torch.tanh(raw_s * (1.0 / bound)) * bound
    if raw_s.device.type != "cpu":
        return torch.mul(raw_s, constant_like(1.0 / bound, raw_s)).tanh_().mul_(
            constant_like(bound, raw_s)
        )
    sig = torch.mul(raw_s, constant_like(2.0 / bound, raw_s)).sigmoid_()
    return sig.mul_(constant_like(2.0 * bound, raw_s)).sub_(constant_like(bound, raw_s))


def _scale_forward(
    x: Tensor, s: Tensor, t: Tensor, transposed: bool = False
) -> tuple[Tensor, Tensor]:
    """``x * exp(s) + t`` and the sum of ``s`` over features; without autograd ``s`` (a fresh
    tensor of the caller's, shaped like ``x``) is overwritten by ``exp(s)`` and then by the
    result instead of allocating more. (Writing into ``s`` rather than a new tensor also
    spares ``addcmul`` a slow path: with ``t`` a strided view of the conditioner's output
    and a fresh output it ran 2-3x slower at 4,096 x 32 float32; the same numbers.)
    ``transposed``: inference on features by rows, summed over dimension 0."""
    if torch.is_grad_enabled():
        return torch.addcmul(t, x, torch.exp(s)), _sum_except_batch(s)
    log_det = s.sum(0) if transposed else _sum_except_batch(s)
    return torch.addcmul(t, x, s.exp_(), out=s), log_det


def _scale_inverse(
    z: Tensor, s: Tensor, t: Tensor, transposed: bool = False
) -> tuple[Tensor, Tensor]:
    """``(z - t) * exp(-s)`` and minus the sum of ``s``; without autograd in place on ``s``
    and on the difference (``transposed`` as for :func:`_scale_forward`)."""
    if torch.is_grad_enabled():
        return (z - t) * torch.exp(-s), -_sum_except_batch(s)
    log_det = (s.sum(0) if transposed else _sum_except_batch(s)).neg_()
    return torch.sub(z, t).mul_(s.neg_().exp_()), log_det


class AffineCoupling(nn.Module):
    r"""Real-NVP affine coupling (Dinh et al., 2016).

    With :math:`b` the binary mask (``True`` = kept), the forward map is

    .. math::
        z = b \odot x + (1 - b) \odot \left(x \odot e^{s(b \odot x)} + t(b \odot x)\right),
        \qquad \log|\det J| = \sum_j (1 - b_j)\, s_j(b \odot x).

    The Jacobian is triangular, so the log-determinant is a sum. The log-scale is bounded
    softly, :math:`s = \beta \tanh(\tilde s / \beta)` with :math:`\beta` = ``scale_bound``, which
    keeps every layer's volume change within :math:`e^{\pm\beta}` per feature and stops
    ``exp`` from overflowing. When the conditioner's last layer starts at zero the coupling
    starts as the identity.

    Parameters
    ----------
    mask : BoolTensor of shape (n_features,) or (channels, height, width)
        ``True`` marks the conditioning part :math:`x_a` (kept fixed, fed to the conditioner).
        An all-``False`` mask is allowed: the conditioner then sees zeros and the coupling is an
        element-wise affine map with learned constants (the case of a single feature).
    conditioner : nn.Module
        Maps a tensor shaped like ``x`` to one with twice the feature (channel) count:
        raw log-scale and shift, concatenated along dimension 1.
    scale_bound : float, default=2.0
        Soft bound :math:`\beta` on :math:`|s|`.
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, scale_bound: float = 2.0) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.conditioner = conditioner
        self.scale_bound = float(scale_bound)
        # The conditioner's input range (set_input_range); None: not clipped.
        self.register_buffer("input_low", None)
        self.register_buffer("input_high", None)
        self._refresh_mask_buffers()

    def _refresh_mask_buffers(self) -> None:
        """Derive the non-persistent helpers from ``mask`` (after init, loading or unpickling)."""
        # Floating copies of the mask, moved and cast with the module by .to(), so a call does
        # not convert the boolean mask again (a training step runs each coupling twice). They
        # broadcast like the mask: over channels when it is (1, H, W).
        keep = self.mask.to(self._float_dtype())
        self.register_buffer("_keep", keep, persistent=False)
        self.register_buffer("_free", 1.0 - keep, persistent=False)
        self.register_buffer("_free_bound", (1.0 - keep) * self.scale_bound, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # An input range belongs to the weights it was measured with: take the loaded one, or
        # none when the state comes without one (as from a flow that was never clipped).
        for name in _RANGE_BUFFERS:
            value = state_dict.get(prefix + name)
            self._buffers[name] = None if value is None else torch.empty_like(
                value, dtype=self._float_dtype(), device=self.mask.device
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_mask_buffers()  # the mask may have been replaced by the loaded one

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name in _RANGE_BUFFERS:  # pickled before couplings could be clipped
            self._buffers.setdefault(name, None)
        self._refresh_mask_buffers()  # derived state; also fills in what older pickles lack

    def _float_dtype(self) -> torch.dtype:
        """The module's floating type: its parameters', else the mask copy's (which ``.to()``
        casts), else torch's default."""
        ref = next((p for p in self.parameters() if p.is_floating_point()), None)
        ref = self._buffers.get("_keep") if ref is None else ref
        return ref.dtype if ref is not None else torch.get_default_dtype()

    def conditioner_input(self, x: Tensor) -> Tensor:
        """What the conditioner is fed for ``x``, before any clipping: here ``x`` with the
        transformed positions zeroed."""
        return x * self._keep

    def set_input_range(self, low: Tensor | None, high: Tensor | None = None) -> None:
        r"""Clip the conditioner's input elementwise to ``[low, high]``; ``None`` removes it.

        Inside the range nothing changes. Beyond it the conditioner sees the nearest point of
        the range, so the scale and shift stop changing and the coupling is an element-wise
        affine map of its transformed part there: the map stays invertible, its
        log-determinant is still :math:`\sum s`, and points far from the rows the range was
        measured on are not moved by the network's extrapolation (see
        :func:`~sknvp.flows.clip_conditioners`).

        Parameters
        ----------
        low, high : Tensor shaped like one row of :meth:`conditioner_input`, or None
            Lower and upper ends, ``low <= high`` everywhere.
        """
        if low is None:
            self.input_low = self.input_high = None
            return
        low = torch.as_tensor(low).detach()
        high = torch.as_tensor(high).detach()
        if low.shape != high.shape or not self._fits_one_input(tuple(low.shape)):
            raise ValueError(
                "The input range must have the shape of one conditioner input, got "
                f"{tuple(low.shape)} and {tuple(high.shape)}."
            )
        if not bool((low <= high).all()):
            raise ValueError("The input range needs low <= high everywhere.")
        options = {"dtype": self._float_dtype(), "device": self.mask.device}
        self.input_low = low.to(**options).clone()
        self.input_high = high.to(**options).clone()

    def _fits_one_input(self, shape: tuple) -> bool:
        # Shaped like the mask, or like one input the mask broadcasts over (channels).
        mask = tuple(self.mask.shape)
        return len(shape) == len(mask) and all(
            m in (1, n) for m, n in zip(mask, shape, strict=True)
        )

    def _clip(self, x_kept: Tensor) -> Tensor:
        low = self.input_low
        return x_kept if low is None else torch.clamp(x_kept, low, self.input_high)

    def _scale_shift(self, x_kept: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.conditioner(self._clip(x_kept)).chunk(2, dim=1)
        # s and t are zeroed on kept positions (tanh(0) = 0), so those stay as they are.
        if torch.is_grad_enabled():
            s = torch.tanh(raw_s * (1.0 / self.scale_bound)) * self._free_bound
        else:
            s = _bounded_log_scale(raw_s, self.scale_bound).mul_(self._free)
        return s, t * self._free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x * self._keep)
        return _scale_forward(x, s, t)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(z * self._keep)
        return _scale_inverse(z, s, t)

    def extra_repr(self) -> str:
        flat = self.mask.reshape(-1).int().tolist()
        shown = flat if len(flat) <= 16 else flat[:16] + ["..."]
        return f"mask={shown}, scale_bound={self.scale_bound}"


class SplitAffineCoupling(AffineCoupling):
    r"""The affine coupling of :class:`AffineCoupling` on vectors, split by index.

    The same map and log-determinant, but the conditioner sees only the kept features and
    returns scale and shift for the transformed ones: it maps ``(batch, n_kept)`` to
    ``(batch, 2 * n_free)`` instead of ``(batch, n)`` to ``(batch, 2 n)`` with half of
    its inputs and outputs masked to zero. Its first and last layers are therefore about half
    the size (a third fewer multiply-adds per coupling of a 64x64 network in 50 dimensions).
    When the kept features form one block (``"alternating"`` masks) the split and the join
    are slices and one concatenation; otherwise they are gathers.

    Parameters
    ----------
    mask : BoolTensor of shape (n_features,)
        ``True`` marks the kept features; at least one feature must be kept and one
        transformed (use :class:`AffineCoupling` otherwise).
    conditioner : nn.Module
        Maps ``(batch, n_kept)`` to ``(batch, 2 * n_free)``: raw log-scale, then shift.
    scale_bound : float, default=2.0
        Soft bound :math:`\beta` on :math:`|s|`.
    """

    def __init__(self, mask: Tensor, conditioner: nn.Module, scale_bound: float = 2.0) -> None:
        mask = mask.bool()
        if mask.dim() != 1 or not bool(mask.any()) or bool(mask.all()):
            raise ValueError(
                "SplitAffineCoupling needs a 1-D mask with both kept and transformed "
                f"features, got shape {tuple(mask.shape)} with {int(mask.sum())} kept."
            )
        super().__init__(mask, conditioner, scale_bound)

    def _refresh_mask_buffers(self) -> None:
        # Index helpers only: this coupling never multiplies by the floating masks.
        mask = self.mask
        kept = torch.nonzero(mask).flatten()
        free = torch.nonzero(~mask).flatten()
        self.register_buffer("_kept_idx", kept, persistent=False)
        self.register_buffer("_free_idx", free, persistent=False)
        self.register_buffer("_unsplit", torch.argsort(torch.cat([kept, free])), persistent=False)
        n, k = mask.numel(), kept.numel()
        # A plain int: reading a buffer goes through nn.Module.__getattr__ on every split,
        # about a microsecond, which training steps of small flows pay twice per coupling.
        self._n_kept = k
        # A block of kept features first or last: slices instead of gathers.
        self._layout = (
            "kept_first" if bool(mask[:k].all()) else
            "kept_last" if bool(mask[n - k:].all()) else "gather"
        )

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = self._n_kept
        if self._layout == "kept_first":
            return x[:, :k], x[:, k:]
        if self._layout == "kept_last":
            return x[:, x.shape[1] - k:], x[:, : x.shape[1] - k]
        return x.index_select(1, self._kept_idx), x.index_select(1, self._free_idx)

    def _join(self, kept: Tensor, free: Tensor) -> Tensor:
        if self._layout == "kept_first":
            return torch.cat([kept, free], dim=1)
        if self._layout == "kept_last":
            return torch.cat([free, kept], dim=1)
        return torch.cat([kept, free], dim=1).index_select(1, self._unsplit)

    def conditioner_input(self, x: Tensor) -> Tensor:
        """What the conditioner is fed for ``x``, before any clipping: the kept features."""
        return self._split(x)[0]

    def _fits_one_input(self, shape: tuple) -> bool:
        return shape == (self._n_kept,)

    def _scale_shift(self, x_kept: Tensor) -> tuple[Tensor, Tensor]:
        raw_s, t = self.conditioner(self._clip(x_kept)).chunk(2, dim=1)
        return _bounded_log_scale(raw_s, self.scale_bound), t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_kept, x_free = self._split(x)
        s, t = self._scale_shift(x_kept)
        x_free, log_det = _scale_forward(x_free, s, t)
        return self._join(x_kept, x_free), log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z_kept, z_free = self._split(z)
        s, t = self._scale_shift(z_kept)
        z_free, log_det = _scale_inverse(z_free, s, t)
        return self._join(z_kept, z_free), log_det


class BatchNormFlow(nn.Module):
    r"""Batch normalisation as an invertible layer (Real-NVP paper, section 3.7).

    .. math:: z = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\, e^{\gamma} + \beta,
        \qquad \log|\det J| = \sum \left(\gamma - \tfrac12 \log(\sigma^2 + \epsilon)\right)

    In training mode :math:`\mu, \sigma^2` are the batch statistics (and update the running
    averages); in evaluation mode the running averages are used, so the layer is a fixed affine
    map and ``inverse`` is its exact inverse. ``inverse`` always uses the running averages.
    Statistics are per feature for ``(batch, n)`` inputs and per channel for images.

    Parameters
    ----------
    n_features : int
        Features (vectors) or channels (images).
    momentum : float, default=0.05
        Weight of the newest batch in the running averages.
    eps : float, default=1e-5
        Added to the variance.
    """

    def __init__(self, n_features: int, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(n_features))
        self.beta = nn.Parameter(torch.zeros(n_features))
        self.register_buffer("running_mean", torch.zeros(n_features))
        self.register_buffer("running_var", torch.ones(n_features))

    def _view(self, v: Tensor, x: Tensor) -> Tensor:
        return v.reshape(1, -1, *([1] * (x.dim() - 2)))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        return mean, var

    def _log_det(self, var: Tensor, x: Tensor) -> Tensor:
        per_unit = self.log_gamma - 0.5 * torch.log(var + self.eps)
        n_positions = x[0, 0].numel()
        return (per_unit.sum() * n_positions).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self._stats(x)
        scale = torch.exp(self.log_gamma) / torch.sqrt(var + self.eps)
        z = (x - self._view(mean, x)) * self._view(scale, x) + self._view(self.beta, x)
        return z, self._log_det(var, x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self.running_mean, self.running_var
        scale = torch.sqrt(var + self.eps) * torch.exp(-self.log_gamma)
        x = (z - self._view(self.beta, z)) * self._view(scale, z) + self._view(mean, z)
        return x, -self._log_det(var, z)


class Standardize(nn.Module):
    r"""Fixed affine map :math:`z = (x - \mathrm{loc}) / \mathrm{scale}` (no trainable parameters).

    Placing it first in a flow lets the coupling layers work on standardised data while the
    flow's density stays in the units of the input: its log-determinant
    :math:`-\sum \log \mathrm{scale}` is part of every log-density.
    """

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        if not bool(torch.all(scale > 0)):
            raise ValueError("Standardize needs strictly positive scales.")
        self.register_buffer("loc", loc.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = -torch.log(self.scale).sum().expand(x.shape[0])
        if torch.is_grad_enabled():
            return (x - self.loc) / self.scale, log_det
        return torch.sub(x, self.loc).div_(self.scale), log_det  # one tensor, not two

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.log(self.scale).sum().expand(z.shape[0])
        if torch.is_grad_enabled():
            return z * self.scale + self.loc, log_det
        return torch.mul(z, self.scale).add_(self.loc), log_det


class TriangularWhitening(nn.Module):
    r"""Fixed linear map :math:`z = L^{-1} x` with :math:`L` lower-triangular (no parameters).

    With :math:`L` the Cholesky factor of the data's covariance :math:`\Sigma = L L^\top`,
    :math:`z` has identity covariance: each feature becomes the residual of its linear
    regression on the features before it, in units of that residual's spread. Placed after
    :class:`Standardize` (with :math:`L` the factor of the correlation matrix), it lets the
    couplings start from a full-covariance Gaussian instead of a diagonal one. Its
    log-determinant :math:`-\sum_j \log L_{jj}` is part of every log-density.

    Parameters
    ----------
    chol : Tensor of shape (n_features, n_features)
        Lower-triangular factor with a strictly positive diagonal (the upper triangle is
        ignored).
    """

    def __init__(self, chol: Tensor) -> None:
        super().__init__()
        if chol.dim() != 2 or chol.shape[0] != chol.shape[1]:
            raise ValueError(
                f"TriangularWhitening needs a square matrix, got shape {tuple(chol.shape)}."
            )
        if not bool(torch.all(torch.diagonal(chol) > 0)):
            raise ValueError("TriangularWhitening needs a strictly positive diagonal.")
        chol = torch.tril(chol)
        self.register_buffer("chol", chol.clone())

    def _log_diag(self) -> Tensor:
        return torch.log(torch.diagonal(self.chol)).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # A triangular solve rather than a stored inverse: a stored inverse stops being the
        # exact inverse of ``chol`` once both are rounded by a cast (float32 training).
        z = torch.linalg.solve_triangular(self.chol, x.T, upper=False).T
        return z, (-self._log_diag()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z @ self.chol.T, self._log_diag().expand(z.shape[0])


# Widest part (features) a run of couplings is applied to transposed during inference on CPU.
# A coupling's scale and shift are then row blocks rather than a few strided columns, which
# element-wise passes stream through faster: matched flows (eight couplings of 64x64, float32,
# one thread) scored 1.33x as many rows per second on 6 features, 1.17x on 10, 1.03-1.07x on
# 16 to 50, and 0.94x on 64 (parts of 32), so parts of up to 16 features run transposed.
COLUMNS_MAX_WIDTH = 16


class _CouplingRun:
    """Layers ``start:stop`` of a stack: consecutive :class:`SplitAffineCoupling` layers that
    all keep one of the same two complementary index sets (``left``, holding the lowest
    feature, and ``right``, each in index order). :meth:`split` and :meth:`join` cut a batch
    into the two parts and put it back (slices where the sets are blocks, the left one
    first, ``boundary`` the column between them; else one gather per part); ``kept_left``
    says for each layer whether it keeps the left part. :meth:`forward` and :meth:`inverse`
    apply the layers to the two parts: the arithmetic of the layers one by one, without a
    split and a join per coupling. The hand-derived gradient uses the same runs."""

    def __init__(self, layers: list[SplitAffineCoupling], start: int = 0) -> None:
        first = layers[0]
        left, right = first._kept_idx, first._free_idx
        if int(right[0]) < int(left[0]):
            left, right = right, left
        self.layers = layers
        self.start, self.stop = start, start + len(layers)
        self.kept_left = [torch.equal(layer._kept_idx, left) for layer in layers]
        self.left, self.right = left, right
        block = torch.equal(left, torch.arange(len(left), device=left.device))
        self.boundary = len(left) if block else None
        self.unsplit = None if block else torch.argsort(torch.cat([left, right]))

    def append(self, layer: SplitAffineCoupling) -> None:
        """Extend the run by ``layer`` (one that :meth:`holds`)."""
        self.layers.append(layer)
        self.kept_left.append(torch.equal(layer._kept_idx, self.left))
        self.stop += 1

    def holds(self, layer: nn.Module) -> bool:
        """Whether ``layer`` is a :class:`SplitAffineCoupling` on this run's two sets."""
        if type(layer) is not SplitAffineCoupling:
            return False
        a, b = layer._kept_idx, layer._free_idx
        return (
            torch.equal(a, self.left) and torch.equal(b, self.right)
            or torch.equal(a, self.right) and torch.equal(b, self.left)
        )

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.boundary is not None:
            return x[:, : self.boundary], x[:, self.boundary:]
        return x.index_select(1, self.left), x.index_select(1, self.right)

    def join(self, left: Tensor, right: Tensor) -> Tensor:
        joined = torch.cat([left, right], dim=1)
        return joined if self.unsplit is None else joined.index_select(1, self.unsplit)

    def _on_columns(self, x: Tensor) -> bool:
        """Whether to run on the transposed parts (features by rows): inference on CPU, both
        parts of 2 to :data:`COLUMNS_MAX_WIDTH` features (one-feature parts keep their
        conditioners' tables), and conditioners that :meth:`MLP.runs_on_columns`."""
        return (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dim() == 2
            and 2 <= min(len(self.left), len(self.right))
            and max(len(self.left), len(self.right)) <= COLUMNS_MAX_WIDTH
            and all(
                type(layer.conditioner) is MLP and layer.conditioner.runs_on_columns()
                for layer in self.layers
            )
        )

    def _split_columns(self, x: Tensor) -> list[Tensor]:
        x_t = x.t().contiguous()
        if self.boundary is not None:
            return [x_t[: self.boundary], x_t[self.boundary:]]
        return [x_t.index_select(0, self.left), x_t.index_select(0, self.right)]

    def _join_columns(self, left: Tensor, right: Tensor) -> Tensor:
        joined = torch.cat([left, right], dim=0)
        if self.unsplit is not None:
            joined = joined.index_select(0, self.unsplit)
        return joined.t().contiguous()

    @staticmethod
    def _scale_shift_columns(layer: SplitAffineCoupling, kept: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`SplitAffineCoupling._scale_shift` on transposed parts."""
        if layer.input_low is not None:
            kept = torch.clamp(kept, layer.input_low.unsqueeze(1), layer.input_high.unsqueeze(1))
        out = layer.conditioner.forward_columns(kept)
        n_free = out.shape[0] // 2
        return _bounded_log_scale(out[:n_free], layer.scale_bound), out[n_free:]

    def _run(self, x: Tensor, log_det: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        """The layers (in reverse and inverted if ``inverse``) on the two parts of ``x``."""
        transposed = self._on_columns(x)
        parts = self._split_columns(x) if transposed else list(self.split(x))
        scale = _scale_inverse if inverse else _scale_forward
        order = zip(self.layers, self.kept_left, strict=True)
        for layer, kept_left in reversed(list(order)) if inverse else order:
            kept, free = (0, 1) if kept_left else (1, 0)
            if transposed:
                s, t = self._scale_shift_columns(layer, parts[kept])
            else:
                s, t = layer._scale_shift(parts[kept])
            parts[free], ld = scale(parts[free], s, t, transposed)
            log_det = ld if log_det is None else log_det + ld
        return (self._join_columns if transposed else self.join)(*parts), log_det

    def forward(self, x: Tensor, log_det: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._run(x, log_det, inverse=False)

    def inverse(self, z: Tensor, log_det: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._run(z, log_det, inverse=True)


def coupling_runs(layers: list[nn.Module]) -> list[_CouplingRun]:
    """The maximal runs of consecutive :class:`SplitAffineCoupling` layers of ``layers`` that
    split into the same two index sets (one layer on its own is a run of one); other layers
    belong to no run."""
    runs: list[_CouplingRun] = []
    for i, layer in enumerate(layers):
        if type(layer) is not SplitAffineCoupling:
            continue
        if runs and runs[-1].stop == i and runs[-1].holds(layer):
            runs[-1].append(layer)
        else:
            runs.append(_CouplingRun([layer], i))
    return runs


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward or backward hooks (a fast path that bypasses
    its call must then not be taken)."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def global_hooks() -> bool:
    """Whether hooks are registered for every module (``register_module_forward_hook``...)."""
    from torch.nn.modules import module as m

    return any(
        getattr(m, name, None)
        for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


class FlowSequential(nn.Sequential):
    """Composition of invertible layers; log-determinants add up.

    Runs of :class:`SplitAffineCoupling` layers that split into the same two index sets
    (``"alternating"`` and ``"checkerboard"`` masks: all the couplings; ``"permuted"``: each
    pair) are applied to the two parts without a split and a join per layer (same results;
    5 to 10 % faster inference in 10 to 50 dimensions). Without autograd on CPU, runs whose
    two parts have 2 to ``COLUMNS_MAX_WIDTH`` features work on the parts transposed (the same
    numbers to rounding; 1.17 times faster on 10 features). Layers with hooks are called one
    by one, as usual.
    """

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        state.pop("_plan_cache", None)  # rebuilt on first use (it names layers by identity)
        return state

    def _plan(self) -> list:
        """The layers in order, runs of couplings grouped into :class:`_CouplingRun`."""
        layers = list(self)
        # The layers and their index tensors themselves (compared by identity; held, so no
        # identity can be reused): appending a layer or loading other masks rebuilds the plan.
        key = [t for m in layers for t in (m, getattr(m, "_kept_idx", None))]
        cached = self.__dict__.get("_plan_cache")
        if cached is not None and len(cached[0]) == len(key) and all(
            map(operator.is_, cached[0], key)
        ):
            return cached[1]
        plan: list = []
        runs = {run.start: run for run in coupling_runs(layers) if len(run.layers) > 1}
        i = 0
        while i < len(layers):
            run = runs.get(i)
            plan.append(layers[i] if run is None else run)
            i = i + 1 if run is None else run.stop
        self.__dict__["_plan_cache"] = (key, plan)
        return plan

    def _items(self) -> list:
        if global_hooks() or any(map(has_hooks, self)):
            return list(self)
        return self._plan()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = None
        for item in self._items():
            if isinstance(item, _CouplingRun):
                x, log_det = item.forward(x, log_det)
                continue
            x, ld = item(x)
            log_det = ld if log_det is None else log_det + ld
        return x, x.new_zeros(x.shape[0]) if log_det is None else log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det = None
        for item in reversed(self._items()):
            if isinstance(item, _CouplingRun):
                z, log_det = item.inverse(z, log_det)
                continue
            z, ld = item.inverse(z)
            log_det = ld if log_det is None else log_det + ld
        return z, z.new_zeros(z.shape[0]) if log_det is None else log_det


ConditionerFactory = Callable[[int, int], nn.Module]
