"""Reductions of a Gaussian mixture's log-densities that avoid two slow paths of torch on CPU.

* ``exp`` of an argument whose result underflows (below about -87 in float32, -708 in
  float64) leaves the vectorised kernel: 20 to 200 times slower per element (torch 2.13,
  AVX-512 host, 1,024 x 64). A mixture of many components has such terms on every row: a
  row near one component is hundreds of nats from most others. :func:`logsumexp` and
  :func:`softmax_from` clamp the shifted log-terms at :data:`exp_floor` first. A term below
  the floor is less than ``exp(floor)`` (1e-19 in float32, 1e-154 in float64) of the largest
  one, far below the rounding of the sum, so the results are the same numbers.
* ``sum`` over a last dimension of 2 or 3 (a mixture's residuals of 2-D data, shape
  ``(rows, components, 2)``) runs at 6 ns per element in float64, 25 times slower than
  adding the slices; :func:`sum_last` adds the slices there (the same numbers, in the same
  order, whatever the number of rows) and calls ``sum`` from four features on, where it is
  fast. (A product with a vector of ones was fast too, but its rounding depended on the
  number of rows in float32.)

:func:`mean_and_standard_error` is the statistic behind every "better by more than noise"
rule: the mixture's size and shrinkage (:mod:`sknvp.em`) and early stopping's comparison
with the start (:func:`sknvp._training.fit_flow`) test paired per-row differences with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["exp_floor", "logsumexp", "mean_and_standard_error", "softmax_from", "sum_last"]


def exp_floor(dtype: torch.dtype) -> float:
    """Half the log of the smallest normal number of ``dtype`` (-43.7 for float32, -354 for
    float64): ``exp`` of anything above it stays in the fast kernel."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


def sum_last(x: Tensor) -> Tensor:
    """``x.sum(-1)``; for a last dimension of 2 or 3, as the sum of its slices."""
    d = x.shape[-1] if x.dim() else 0
    if d not in (2, 3):
        return x.sum(-1)
    total = x[..., 0] + x[..., 1]
    return total.add_(x[..., 2]) if d == 3 else total


def logsumexp(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp(x, dim, keepdim)``, with the shifted terms clamped at
    :func:`exp_floor` (module docstring). Rows whose largest term is not finite get it
    (``-inf`` for all ``-inf``, ``inf``, ``nan``), as torch does; differentiable (the clamped
    terms get no gradient, where the exact one is below ``exp(floor)``)."""
    top = x.detach().amax(dim, keepdim=True)
    finite = torch.isfinite(top)
    shift = torch.where(finite, top, torch.zeros_like(top))
    floor = exp_floor(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        out = (x - shift).clamp_min(floor).exp().sum(dim, keepdim=True).log() + shift
    else:
        terms = torch.sub(x, shift).clamp_min_(floor).exp_()
        out = terms.sum(dim, keepdim=True).log_().add_(shift)
    out = torch.where(finite, out, top)
    return out if keepdim else out.squeeze(dim)


def softmax_from(x: Tensor, lse: Tensor) -> Tensor:
    """``exp(x - lse)`` (``lse`` broadcast, e.g. :func:`logsumexp` with ``keepdim=True``),
    clamped at :func:`exp_floor` before ``exp``; for tensors that need no gradient."""
    return torch.sub(x, lse).clamp_min_(exp_floor(x.dtype)).exp_()


def mean_and_standard_error(values: Tensor, w: Tensor) -> tuple[float, float]:
    r"""Weighted mean of ``values`` and its standard error, for weights ``w`` that sum to the
    number of rows (:math:`\bar v = \sum_i w_i v_i / n`, standard error
    :math:`\sqrt{\sum_i w_i (v_i - \bar v)^2 / n^2}`)."""
    n = values.shape[0]
    mean = float((values * w).sum()) / n
    spread = float(((values - mean) ** 2 * w).sum()) / n
    return mean, math.sqrt(max(spread, 0.0) / n)
