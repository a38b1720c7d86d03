r"""Gaussian kernel density estimates with one shared covariance (torch only).

A kernel estimate on rows :math:`c_j` with weights :math:`w_j` is the mixture

.. math::
    p(x) = \sum_j \frac{w_j}{\sum_l w_l}\, \mathcal N(x; c_j, h^2 S),

with :math:`S` one of three shapes made from the rows' weighted covariance :math:`\Sigma`:
``"full"`` (:math:`\Sigma` itself: the estimate then moves with any invertible affine map of
the rows), ``"diagonal"`` (its diagonal: each feature's own scale) or ``"spherical"``
(:math:`\operatorname{tr}\Sigma / D` times the identity: the rows' own units, as
scikit-learn's :class:`~sklearn.neighbors.KernelDensity`). The shape and the bandwidth
:math:`h` are chosen by leave-one-out log-likelihood. :class:`~sknvp.RealNVPDensity` uses
the estimate as the base of a flow on a few hundred rows, where held-out rows show that it
beats both the trained couplings and their Gaussian-mixture start (the user guide's
"Flows" page, "A kernel base on a few hundred rows").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._reduce import logsumexp
from .em import _floored, _normalised_weights, _precision_cholesky
from .mixture import GaussianMixtureBase

__all__ = [
    "BANDWIDTH_GRID", "SHAPES", "KernelBase", "KernelFit", "fit_kernel", "kernel_log_densities",
]

# Bandwidths tried, relative to the rows' covariance: a kernel of h = 1 is as wide as the
# data. Scott's rule gives 0.3 to 0.7 for 10 to 1,000 rows in 1 to 10 dimensions; clustered
# or curved data want less.
BANDWIDTH_GRID = tuple(float(h) for h in torch.logspace(math.log10(0.003), 0.0, 49).tolist())

SHAPES = ("full", "diagonal", "spherical")

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_RIDGE = 1e-9  # of the covariance's mean eigenvalue, added to its diagonal (constant features)


@dataclass
class KernelFit:
    """A kernel estimate: its rows ``centers``, their normalised ``weights``, the upper
    Cholesky factor ``precision_cholesky`` of :math:`(h^2 S)^{-1}`, the ``bandwidth``
    :math:`h` and the ``shape`` of :math:`S` (one of :data:`SHAPES`)."""

    centers: Tensor
    weights: Tensor
    precision_cholesky: Tensor
    bandwidth: float
    shape: str = "full"


def _precision_factor(x: Tensor, w: Tensor, shape: str, axes: Tensor | None = None) -> Tensor:
    """Upper-triangular :math:`P` with :math:`P P^\\top = S^{-1}` for the ``shape`` made from
    the weighted covariance :math:`\\Sigma` of ``x`` (see :func:`fit_kernel` for ``axes``),
    plus ``_RIDGE`` times its mean eigenvalue (or 1 where that is 0) on the diagonal, so that
    a constant feature leaves it invertible. Raises ``ValueError`` for a shape that ``axes``
    leave undefined (singular, or overflowing)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
    centred = x - w @ x
    cov = (centred * w[:, None]).T @ centred
    d = x.shape[1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    if shape != "full":
        # The covariance in the coordinates of the axes, y = B^-1 x, reduced to the shape.
        try:
            inner = cov if axes is None else torch.linalg.solve(
                axes, torch.linalg.solve(axes, cov).T
            )
        except torch.linalg.LinAlgError as err:
            raise ValueError(f"The {shape} shape is not defined for singular axes.") from err
        inner = (torch.diag_embed(torch.diagonal(inner)) if shape == "diagonal"
                 else float(torch.diagonal(inner).sum()) / d * eye)
        cov = inner if axes is None else axes @ inner @ axes.T
        if not bool(torch.isfinite(cov).all()):
            raise ValueError(f"The {shape} shape is not defined for these axes.")
    scale = float(torch.diagonal(cov).sum()) / d
    try:
        return _precision_cholesky(cov + _RIDGE * (scale if scale > 0 else 1.0) * eye)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"The {shape} shape is singular for these rows.") from err


def _squared_distances(a: Tensor, b: Tensor, prec: Tensor) -> Tensor:
    """:math:`|P^\\top (a_i - b_j)|^2` for every pair of rows, shape ``(len(a), len(b))``."""
    ya, yb = a @ prec, b @ prec
    return torch.cdist(ya, yb, compute_mode="donot_use_mm_for_euclid_dist").square_()


def _log_densities(sq: Tensor, log_w: Tensor, prec: Tensor, bandwidth: float) -> Tensor:
    """Log-densities of the kernel estimate of bandwidth ``bandwidth`` at query rows whose
    squared distances to the centres (of log-weights ``log_w``) are ``sq``."""
    d = prec.shape[0]
    log_det = float(torch.log(torch.diagonal(prec)).sum()) - d * math.log(bandwidth)
    # The floored logsumexp: far rows' terms underflow, and exp's slow path would take them.
    scores = logsumexp(torch.add(log_w, sq, alpha=-0.5 / (bandwidth * bandwidth)), 1)
    return scores + (log_det - d * _HALF_LOG_2PI)


def _best_bandwidth(score, grid: tuple[float, ...], step: int = 4) -> tuple[float, float]:
    """The ``(score, h)`` of ``grid`` with the highest ``score(h)``, searched coarse to fine
    (the likelihood is smooth in ``h``): every ``step``-th bandwidth, then the two at half
    that distance beside the best so far, and so on down to the neighbours."""
    tried = {i: score(grid[i]) for i in range(0, len(grid), step)}
    while step > 1:
        step //= 2
        top = max(tried, key=tried.get)
        for i in (top - step, top + step):
            if 0 <= i < len(grid) and i not in tried:
                tried[i] = score(grid[i])
    top = max(tried, key=tried.get)
    return tried[top], grid[top]


def fit_kernel(
    x: Tensor,
    weights: Tensor | None = None,
    grid: tuple[float, ...] = BANDWIDTH_GRID,
    shapes: tuple[str, ...] = SHAPES,
    axes: Tensor | None = None,
) -> KernelFit:
    """The kernel estimate on the rows of ``x`` of positive weight, with the shape of
    ``shapes`` and the bandwidth of ``grid`` whose leave-one-out log-likelihood (each row
    scored by the estimate on the others, weighted mean over rows) is highest. Needs at
    least two such rows.

    ``axes``, an invertible matrix :math:`B`, says in which coordinates the ``"diagonal"``
    and ``"spherical"`` shapes are meant: those of :math:`y = B^{-1} x` (a kernel of shape
    :math:`S_y` there is :math:`B S_y B^\\top` here). :class:`~sknvp.RealNVPDensity` fits
    the estimate in the standardised coordinates its flow hands the base, with :math:`B`
    that map's inverse up to a factor, so that the shapes are those of the user's features.
    A shape that ``axes`` leave singular or overflowing is skipped.

    Examples
    --------
    >>> import torch
    >>> from sknvp.kernel import fit_kernel, kernel_log_densities
    >>> rows = torch.randn(200, 2, generator=torch.Generator().manual_seed(0),
    ...                    dtype=torch.float64)
    >>> fit = fit_kernel(rows)
    >>> 0.1 < fit.bandwidth < 1.0
    True
    >>> kernel_log_densities(fit, torch.zeros(1, 2, dtype=torch.float64)).shape
    torch.Size([1])
    """
    w = _normalised_weights(x, weights)
    keep = w > 0
    x, w = x[keep], w[keep] / w[keep].sum()
    if x.shape[0] < 2:
        raise ValueError(
            f"A kernel estimate needs at least 2 rows of positive weight, got {x.shape[0]}."
        )
    # The others' weights, renormalised: log w_j - log(1 - w_i).
    log_w = torch.log(w)
    rest = torch.log1p(-w)
    if x.shape[1] == 1:  # one feature: the three shapes are the same kernel
        shapes = shapes[:1]
    best = (-math.inf, grid[0], shapes[0], None)
    for shape in shapes:
        try:
            prec = _precision_factor(x, w, shape, axes)
        except ValueError:
            if shape not in SHAPES or shape == "full":
                raise
            continue
        sq = _squared_distances(x, x, prec)
        sq.fill_diagonal_(math.inf)  # leave each row out of its own estimate

        def score(h, sq=sq, prec=prec):
            return float(_floored(_log_densities(sq, log_w, prec, h) - rest) @ w)

        value, h = _best_bandwidth(score, grid)
        if value > best[0]:
            best = (value, h, shape, prec)
    _, h, shape, prec = best
    return KernelFit(x, w, prec / h, h, shape)


def kernel_log_densities(fit: KernelFit, x: Tensor, chunk_rows: int = 4096) -> Tensor:
    """Log-density of each row of ``x`` under ``fit``, shape ``(n,)``."""
    log_w = torch.log(fit.weights)
    unit = fit.precision_cholesky * fit.bandwidth
    parts = [
        _log_densities(_squared_distances(x[a:a + chunk_rows], fit.centers, unit), log_w,
                       unit, fit.bandwidth)
        for a in range(0, x.shape[0], chunk_rows)
    ]
    return torch.cat(parts) if parts else x.new_zeros(0)


class KernelBase(GaussianMixtureBase):
    r"""A kernel estimate as a flow's base: a :class:`~sknvp.mixture.GaussianMixtureBase`
    with one component per row and one precision factor shared by all of them.

    Log-densities then take one product of the rows with the shared factor and the squared
    distances to every centre, :math:`O(K D)` per row instead of the general mixture's
    :math:`O(K D^2)`; the Rosenblatt transform, its inverse and sampling are the mixture's.

    Parameters
    ----------
    weights : Tensor of shape (n_components,)
        Weights of the rows (positive; normalised here).
    centers : Tensor of shape (n_components, n_features)
        The rows.
    precision_cholesky : Tensor of shape (n_features, n_features)
        Upper-triangular :math:`P` with :math:`P P^\top = (h^2 \Sigma)^{-1}`.
    """

    def __init__(self, weights: Tensor, centers: Tensor, precision_cholesky: Tensor) -> None:
        centers = torch.as_tensor(centers)
        d = centers.shape[1]
        prec = torch.as_tensor(precision_cholesky, dtype=centers.dtype)
        if prec.shape != (d, d):
            raise ValueError(
                f"Expected precision_cholesky of shape ({d}, {d}) for centers of shape "
                f"{tuple(centers.shape)}; got {tuple(prec.shape)}."
            )
        # The mixture's checks and parameters, on a one-component factor kept as (1, D, D).
        super().__init__(weights, centers, prec.expand(centers.shape[0], d, d))
        with torch.no_grad():
            self.log_diag = nn.Parameter(self.log_diag[:1].clone())
            self.upper = nn.Parameter(self.upper[:1].clone())

    @classmethod
    def from_fit(cls, fit: KernelFit) -> KernelBase:  # type: ignore[override]
        """The base of a :func:`fit_kernel` estimate, in its dtype and device."""
        return cls(fit.weights, fit.centers, fit.precision_cholesky)

    def precisions_cholesky(self) -> Tensor:
        """The shared factor, repeated for every component: shape ``(K, D, D)``."""
        return super().precisions_cholesky().expand(self.n_components, -1, -1)

    def component_log_probs(self, u: Tensor) -> Tensor:
        """:math:`\\log \\pi_k + \\log \\mathcal N(u; c_k, h^2 \\Sigma)`, shape ``(n, K)``."""
        prec = super().precisions_cholesky()[0]
        y, c = u @ prec, self.means @ prec
        log_w = torch.log_softmax(self.logits, 0) + (
            self.log_diag.sum() - self.n_features * _HALF_LOG_2PI
        )
        if torch.is_grad_enabled():
            sq = (y * y).sum(1, keepdim=True) + (c * c).sum(1) - 2.0 * (y @ c.T)
            return log_w - 0.5 * sq.clamp_min(0.0)
        # |y - c|^2 = |c|^2 - 2 y.c + |y|^2, in place in the product's own (n, K) output.
        sq = torch.addmm((c * c).sum(1), y, c.T, alpha=-2.0)
        sq.add_((y * y).sum(1, keepdim=True)).clamp_min_(0.0)
        return sq.mul_(-0.5).add_(log_w)

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}, n_features={self.n_features}, tied"
