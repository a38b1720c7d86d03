r"""A ReLU network of one input as the piecewise-linear function it is.

A fully connected network with one input and ReLU or leaky-ReLU activations computes a
continuous piecewise-linear function of that input: every unit is affine in :math:`x` between
the points where some unit of an earlier layer changes sign. The conditioner of a coupling
that keeps one feature (every coupling of a 2-D flow) is such a network. Written down once as
its breakpoints :math:`b_1 < \dots < b_{P-1}` and, on each of the :math:`P` pieces, the value
and slope of every output at the piece's left end, the network evaluates a row with a binary
search and one multiply-add per output, where the layers themselves take
:math:`2 \sum_l h_{l-1} h_l` multiply-adds (8,500 for a 2x64 network): the same function, up
to rounding.

:func:`piecewise_linear` builds the table (pure torch, float64) and :func:`evaluate_table`
uses it. :func:`use_tables` lets every :class:`~sknvp.nets.MLP` of a module do both by itself
when autograd is off; :class:`~sknvp.RealNVPDensity` switches it on for inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PiecewiseLinear", "evaluate_table", "is_piecewise_linear", "piecewise_linear", "use_tables",
]


@dataclass(frozen=True)
class PiecewiseLinear:
    """A continuous piecewise-linear map from one input to ``values.shape[1]`` outputs:
    ``breaks`` (P - 1,) ascending; ``starts`` (P,) the left end of each piece (the first
    piece's is ``breaks[0]``, or 0 with one piece); ``values`` and ``slopes`` (P, outputs) the
    outputs at ``starts`` and their derivatives on each piece."""

    breaks: Tensor
    starts: Tensor
    values: Tensor
    slopes: Tensor

    @property
    def n_pieces(self) -> int:
        return self.values.shape[0]

    def to(self, *args, **kwargs) -> PiecewiseLinear:
        return PiecewiseLinear(*(t.to(*args, **kwargs) for t in vars(self).values()))


def _slopes_of(layer: nn.Module) -> float | None:
    """The activation's slope below zero (0 for ReLU), or None for any other layer."""
    if type(layer) is nn.ReLU:
        return 0.0
    if type(layer) is nn.LeakyReLU:
        return float(layer.negative_slope)
    return None


def is_piecewise_linear(net: nn.Sequential) -> bool:
    """Whether ``net`` is ``Linear(1, .)`` then (ReLU or LeakyReLU, Linear) pairs, all
    plain modules (exactly those types) with biases."""
    layers = list(net)
    if not layers or len(layers) % 2 == 0:
        return False
    for i, layer in enumerate(layers):
        if i % 2 == 0:
            if type(layer) is not nn.Linear or layer.bias is None:
                return False
        elif _slopes_of(layer) is None:
            return False
    return layers[0].in_features == 1


def piecewise_linear(net: nn.Sequential, max_pieces: int = 1 << 15) -> PiecewiseLinear | None:
    """The table of ``net`` (see :func:`is_piecewise_linear`), in float64 on ``net``'s device;
    None where ``net`` is not of that form or needs more than ``max_pieces`` pieces.

    Examples
    --------
    >>> import torch
    >>> from sknvp.nets import MLP
    >>> from sknvp.piecewise import evaluate_table, piecewise_linear
    >>> net = MLP(1, 2, (16, 16)).double()
    >>> _ = torch.nn.init.normal_(net[-1].weight)
    >>> table = piecewise_linear(net)
    >>> x = torch.linspace(-5, 5, 101, dtype=torch.float64)[:, None]
    >>> with torch.no_grad():
    ...     bool(torch.allclose(evaluate_table(table, x), net(x), atol=1e-12))
    True
    """
    if not is_piecewise_linear(net):
        return None
    layers = list(net)
    first = layers[0]
    options = {"dtype": torch.float64, "device": first.weight.device}
    with torch.no_grad():
        # Each piece j: units = A[j] * x + C[j]; pieces split at `breaks` (ascending).
        A = first.weight.detach().to(**options)[:, 0][None, :]
        C = first.bias.detach().to(**options)[None, :]
        breaks = torch.empty(0, **options)
        for act, linear in zip(layers[1::2], layers[2::2], strict=True):
            breaks, A, C = _split_at_sign_changes(breaks, A, C)
            if A.shape[0] > max_pieces:
                return None
            x = _inner_points(breaks)
            negative = A * x[:, None] + C <= 0
            # (Python scalars would make where() float32: 0.01 off by 2e-8.)
            factor = torch.where(negative, A.new_tensor(_slopes_of(act)), A.new_tensor(1.0))
            W = linear.weight.detach().to(**options)
            b = linear.bias.detach().to(**options)
            A, C = (A * factor) @ W.T, (C * factor) @ W.T + b
        starts = torch.cat([breaks[:1], breaks]) if len(breaks) else torch.zeros(1, **options)
        # The values at the starts from the layers themselves, not from the accumulated
        # intercepts C (whose cancellations cost up to 1e-9 of the outputs' scale).
        return PiecewiseLinear(breaks, starts, _layer_by_layer(layers, starts[:, None]), A)


def _layer_by_layer(layers: list, x: Tensor) -> Tensor:
    """The network's own forward pass, in float64 whatever its parameters' dtype."""
    for layer in layers:
        if type(layer) is nn.Linear:
            x = torch.nn.functional.linear(
                x, layer.weight.detach().to(x), layer.bias.detach().to(x)
            )
        else:
            x = torch.where(x > 0, x, x * _slopes_of(layer))
    return x


def _inner_points(breaks: Tensor) -> Tensor:
    """A point inside each piece (pieces are ``(-inf, b0], (b0, b1], ..., (b_last, inf)``)."""
    if len(breaks) == 0:
        return breaks.new_zeros(1)
    mids = 0.5 * (breaks[:-1] + breaks[1:])
    return torch.cat([breaks[:1] - 1.0, mids, breaks[-1:] + 1.0])


def _split_at_sign_changes(breaks: Tensor, A: Tensor, C: Tensor):
    """Add the points where a unit of some piece crosses zero inside that piece."""
    lo = torch.cat([breaks.new_tensor([-torch.inf]), breaks])[:, None]
    hi = torch.cat([breaks, breaks.new_tensor([torch.inf])])[:, None]
    roots = -C / torch.where(A == 0, torch.ones_like(A), A)
    inside = (A != 0) & (roots > lo) & (roots < hi) & torch.isfinite(roots)
    new = torch.cat([breaks, roots[inside]])
    new = torch.unique(new)  # sorted
    # Each new piece inherits the affine map of the old piece containing it.
    parent = torch.searchsorted(breaks, _inner_points(new), right=False)
    return new, A[parent], C[parent]


def evaluate_table(table: PiecewiseLinear, x: Tensor) -> Tensor:
    """``net(x)`` for ``x`` of shape ``(n, 1)``, from ``net``'s table: shape ``(n, outputs)``,
    in ``x``'s dtype (the table must be on ``x``'s device and in its dtype, or float64)."""
    col = x[:, 0]
    piece = torch.searchsorted(table.breaks, col.contiguous())
    if table.values.dtype != x.dtype:
        table = table.to(dtype=x.dtype)
    offset = (col - table.starts[piece])[:, None]
    return torch.addcmul(table.values[piece], table.slopes[piece], offset)


def use_tables(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Let every :class:`~sknvp.nets.MLP` in ``module`` evaluate its piecewise-linear table
    whenever autograd is off and it is fed one input feature (or stop, with ``enabled=False``);
    returns ``module``. Networks of another form keep running their layers. The switch is not
    copied or pickled with the module: a copy, which may be trained, runs its layers until
    switched on itself. Tables are rebuilt whenever a parameter changed.

    Examples
    --------
    >>> import torch
    >>> from sknvp.nets import MLP
    >>> from sknvp.piecewise import use_tables
    >>> net = use_tables(MLP(1, 2, (8,)))
    >>> with torch.no_grad():
    ...     net(torch.zeros(3, 1)).shape
    torch.Size([3, 2])
    """
    for m in module.modules():
        if hasattr(m, "_piecewise_table"):
            m.__dict__["_use_tables"] = bool(enabled)
            if not enabled:
                m.__dict__.pop("_piecewise_cache", None)
    return module
