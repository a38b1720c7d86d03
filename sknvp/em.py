r"""Expectation-maximisation for full-covariance Gaussian mixtures, with BIC model selection.

What a :class:`~sknvp.mixture.GaussianMixtureBase` starts from: :func:`fit_gaussian_mixture`
fits one size (k-means++ seeding, a few Lloyd steps, then EM), :func:`select_gaussian_mixture`
tries sizes 1, 2, 3, ... and keeps the one with the best held-out log-likelihood (on
validation rows, and on small data also by cross-validation), or on many rows without
validation rows the lowest Bayesian information criterion,

.. math:: \mathrm{BIC} = -2 \sum_i w_i \log p(x_i) + m \log n,
    \qquad m = (K - 1) + K D + K D (D + 1) / 2,

with the weights :math:`w` normalised to sum to the number of rows :math:`n`. (BIC is built
to find a true number of components; for a density that is scored on new rows it stops
early: on 9,000 rows of the benchmark's two-arm spiral it chose 35 components, the
validation rows 55, which scored 0.015 nat per test row higher.) The algorithm is
scikit-learn's ``GaussianMixture(covariance_type="full")`` (``reg_covar`` added to every
covariance's diagonal, convergence when the mean log-likelihood gains less than ``tol``), with
sample weights, batched over components, and the E-step in row chunks so that memory stays
bounded whatever the number of rows. After training, :func:`refit_gaussian_mixture` runs EM
again from the trained mixture, on the rows as the fitted couplings map them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ._reduce import logsumexp, mean_and_standard_error, softmax_from, sum_last

__all__ = [
    "SHRINKAGE_GRID",
    "MixtureFit",
    "choose_shrinkage",
    "data_reg_covar",
    "fit_gaussian_mixture",
    "log_likelihoods",
    "max_mixture_size",
    "mean_log_likelihood",
    "mixture_sizes",
    "refit_gaussian_mixture",
    "select_gaussian_mixture",
    "shrink_covariances",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_MULTI_START_SIZES = 10  # select_gaussian_mixture's n_init starts for sizes up to this
_CHUNK_VALUES = 2**20  # rows x components x features per E-step chunk
# select_gaussian_mixture keeps the validation rows' own choice over the cross-validated one
# only where the latter scores them this many standard errors lower: a check against a poor
# EM optimum of the fit to all rows, not a second vote. At one standard error a few dozen
# heavy-tailed validation rows overrode the pooled choice by chance (wine: 0.44 nat per row
# lower over 12 splits; docs/benchmarks.md, "Choosing the mixture's size ...").
_VALIDATION_CHECK_SE = 2.0
SHRINKAGE_GRID = (0.0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass
class MixtureFit:
    """A fitted mixture: ``weights`` (K,), ``means`` (K, D), ``precisions_cholesky`` (K, D, D)
    (upper-triangular, :math:`\\Sigma_k^{-1} = P_k P_k^\\top`), the weighted mean
    log-likelihood of the rows it was fitted to, its BIC on them, EM iterations run, whether
    EM converged, the covariances (K, D, D) and the shrinkage :math:`\\rho` applied to them
    (:func:`shrink_covariances`)."""

    weights: Tensor
    means: Tensor
    precisions_cholesky: Tensor
    log_likelihood: float
    bic: float
    n_iter: int
    converged: bool
    covariances: Tensor | None = None
    shrinkage: float = 0.0

    @property
    def n_components(self) -> int:
        return self.means.shape[0]


def _normalised_weights(x: Tensor, weights: Tensor | None) -> Tensor:
    """Row weights summing to the number of rows."""
    n = x.shape[0]
    if weights is None:
        return x.new_ones(n)
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    return w * (n / w.sum())


def _weighted_mean(values: Tensor, w: Tensor) -> float:
    """Mean of ``values`` under weights ``w`` that sum to the number of rows."""
    return float((values * w).sum()) / values.shape[0]


def max_mixture_size(n_rows: int, n_features: int) -> int:
    """Most components a full-covariance mixture of ``n_rows`` rows is given: one per
    ``n_features + 1`` rows (fewer rows leave a covariance singular), at least one."""
    return max(1, n_rows // (n_features + 1))


def _kmeans_plus_plus(x: Tensor, w: Tensor, k: int, generator) -> Tensor:
    """Seeds drawn one at a time with probability proportional to weight times the squared
    distance to the nearest seed so far (Arthur & Vassilvitskii, 2007)."""
    first = torch.multinomial(w, 1, generator=generator)
    centers = [x[first[0]]]
    nearest = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = w * nearest
        p = p if bool(p.sum() > 0) else w  # every row sits on a seed already
        i = torch.multinomial(p, 1, generator=generator)[0]
        centers.append(x[i])
        nearest = torch.minimum(nearest, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centers)


def _lloyd(x: Tensor, w: Tensor, centers: Tensor, n_steps: int) -> Tensor:
    """A few weighted k-means steps; returns each row's cluster."""
    k = centers.shape[0]
    for _ in range(n_steps):
        labels = torch.cdist(x, centers).argmin(1)
        counts = x.new_zeros(k).index_add_(0, labels, w)
        sums = x.new_zeros(centers.shape).index_add_(0, labels, x * w[:, None])
        filled = counts > 0
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1e-300)[:, None], centers)
    return torch.cdist(x, centers).argmin(1)


def _precision_cholesky(cov: Tensor) -> Tensor:
    """Upper-triangular :math:`P` with :math:`P P^\\top = \\Sigma^{-1}` for each covariance."""
    chol = torch.linalg.cholesky(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    return torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)


def _chunks(n: int, k: int, d: int):
    rows = max(1, _CHUNK_VALUES // max(k * d, 1))
    return [slice(a, min(a + rows, n)) for a in range(0, n, rows)]


def standardized_residuals(u: Tensor, means: Tensor, prec: Tensor) -> Tensor:
    r""":math:`\varepsilon_k = P_k^\top (u - \mu_k)` for every row and component, shape
    ``(n, K, D)``, with one matrix product for all components (:math:`u P_k - \mu_k P_k`).

    ``means`` has shape ``(K, D)`` and ``prec`` (the upper-triangular factors :math:`P_k`)
    ``(K, D, D)``.
    """
    K, D = means.shape
    stacked = prec.permute(1, 0, 2).reshape(D, K * D)
    products = (u @ stacked).view(-1, K, D)
    offsets = torch.einsum("kd,kde->ke", means, prec)
    # Without autograd in the product's own output: one (n, K, D) tensor, not two.
    return products - offsets if torch.is_grad_enabled() else products.sub_(offsets)


def component_log_probs(
    x: Tensor, log_w: Tensor, means: Tensor, prec: Tensor, log_det: Tensor | None = None
) -> Tensor:
    """:math:`\\log w_k + \\log \\mathcal N(x_i; \\mu_k, \\Sigma_k)`, shape (n, K).

    ``log_det`` is :math:`\\sum_d \\log P_{k,dd}` per component (computed from ``prec`` when
    None). Without autograd the (fresh) residuals are squared in place: one (n, K, D) tensor
    instead of two.
    """
    D = means.shape[1]
    y = standardized_residuals(x, means, prec)
    if log_det is None:
        log_det = torch.log(torch.diagonal(prec, dim1=1, dim2=2)).sum(1)
    const = log_w + log_det - D * _HALF_LOG_2PI
    if torch.is_grad_enabled():
        return const - 0.5 * sum_last(y * y)
    return torch.add(const, sum_last(y.square_()), alpha=-0.5)


def _moments(x: Tensor, k: int, weighted_responsibilities):
    """Zeroth, first and second moments of the rows per component, and the summed second
    output of ``weighted_responsibilities(rows) -> (r, total)`` (r of shape (rows, k)),
    accumulated over row chunks."""
    d = x.shape[1]
    n_k, s_x, s_xx = x.new_zeros(k), x.new_zeros(k, d), x.new_zeros(k, d, d)
    total = x.new_zeros(())
    for s in _chunks(x.shape[0], k, d):
        xc = x[s]
        r, part = weighted_responsibilities(s)
        total += part
        n_k += r.sum(0)
        s_x += r.t() @ xc
        s_xx += (r.t()[:, :, None] * xc).transpose(1, 2) @ xc
    return n_k, s_x, s_xx, total


def _statistics(x: Tensor, w: Tensor, log_w, means, prec):
    """E-step: the moments under the responsibilities, and the weighted log-likelihood."""

    def soft(s):
        lp = component_log_probs(x[s], log_w, means, prec)
        lse = logsumexp(lp, 1)
        return softmax_from(lp, lse[:, None]).mul_(w[s, None]), (lse * w[s]).sum()

    return _moments(x, means.shape[0], soft)


def _m_step(n_k, s_x, s_xx, reg_covar: float):
    n_k = n_k + 10 * torch.finfo(n_k.dtype).eps  # an empty component keeps finite numbers
    means = s_x / n_k[:, None]
    cov = s_xx / n_k[:, None, None] - means[:, :, None] * means[:, None, :]
    cov = 0.5 * (cov + cov.transpose(1, 2))
    cov = cov + reg_covar * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.log(n_k / n_k.sum()), means, _precision_cholesky(cov), cov


def _hard_statistics(x: Tensor, w: Tensor, labels: Tensor, k: int):
    """The moments of the k-means clusters (each row wholly in its cluster)."""

    def hard(s):
        r = torch.nn.functional.one_hot(labels[s], k).to(x.dtype) * w[s, None]
        return r, x.new_zeros(())

    return _moments(x, k, hard)[:3]


def data_reg_covar(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    reg_covar: float = 1e-6,
    share: float = 1e-2,
    floor: float = 1e-12,
) -> float:
    """``reg_covar``, but at most ``share`` of the smallest variance of the rows in any
    direction (the least eigenvalue of their weighted covariance), and at least ``floor``.

    A fixed ``reg_covar`` is an absolute floor on every component's variance: where features
    are (nearly) linear combinations of others, it smears the density across the thin
    direction the data occupy (three features with the third the sum of the others plus noise
    of 1e-6: 2.5 nats per row instead of 9.5). Scaled down there, it still keeps covariances
    invertible, and on data without such a direction (least eigenvalue above
    ``reg_covar / share``) it is ``reg_covar`` unchanged. So it is with fewer than
    ``2 (n_features + 1)`` rows of positive weight, where a small eigenvalue says more about
    the sample than about the data (with no more rows than features it is 0).
    """
    n, d = x.shape
    w = _normalised_weights(x, weights)
    if int((w > 0).sum()) < 2 * (d + 1):
        return reg_covar
    centred = x - (w @ x) / n
    cov = (centred * w[:, None]).T @ centred / n
    least = float(torch.linalg.eigvalsh(0.5 * (cov + cov.T))[0])
    return max(floor, min(reg_covar, share * max(least, 0.0)))


def fit_gaussian_mixture(
    x: Tensor,
    n_components: int,
    *,
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
    n_lloyd: int = 10,
    init: MixtureFit | None = None,
    n_init: int = 1,
) -> MixtureFit:
    """Fit a ``n_components`` full-covariance Gaussian mixture to the rows of ``x`` by EM.

    Parameters
    ----------
    x : Tensor of shape (n_samples, n_features)
        Rows (float64 recommended).
    n_components : int
        Number of components, at most ``n_samples``.
    weights : Tensor of shape (n_samples,), optional
        Non-negative row weights (a row of weight 2 counts as two rows).
    generator : torch.Generator, optional
        Randomness of the k-means++ seeding.
    reg_covar : float, default=1e-6
        Added to the diagonal of every covariance.
    tol : float, default=1e-3
        EM stops when the weighted mean log-likelihood gains less than this.
    max_iter : int, default=100
        Most EM iterations.
    n_lloyd : int, default=10
        k-means steps after the seeding, whose clusters start EM.
    init : MixtureFit, optional
        Start EM from this mixture's weights, means and precisions (``n_components`` of them)
        instead of k-means++ clusters: to refine a mixture on other rows, or a trained one.
    n_init : int, default=1
        Number of k-means++ starts, each run to convergence; the fit with the highest
        log-likelihood on ``x`` is returned (scikit-learn's ``n_init``). Must be 1 with
        ``init``.
    """
    n = x.shape[0]
    if not 1 <= n_components <= n:
        raise ValueError(f"n_components must be in [1, {n}] for {n} rows, got {n_components}.")
    if n_init < 1 or (init is not None and n_init != 1):
        raise ValueError(f"n_init must be at least 1, and 1 with init; got {n_init}.")
    w = _normalised_weights(x, weights)
    if n_init > 1:
        fits = [
            _fit_once(x, n_components, w, generator, reg_covar, tol, max_iter, n_lloyd, None)
            for _ in range(n_init)
        ]
        # max keeps the first of equals; a NaN log-likelihood never wins.
        return max(fits, key=_likelihood_or_minus_inf)
    return _fit_once(x, n_components, w, generator, reg_covar, tol, max_iter, n_lloyd, init)


def _likelihood_or_minus_inf(fit: MixtureFit) -> float:
    return -math.inf if math.isnan(fit.log_likelihood) else fit.log_likelihood


def _fit_once(x, n_components, w, generator, reg_covar, tol, max_iter, n_lloyd, init):
    """One EM run of :func:`fit_gaussian_mixture` from one start."""
    n, d = x.shape
    if init is not None:
        if init.means.shape != (n_components, d):
            raise ValueError(
                f"init has {init.n_components} components of {init.means.shape[1]} features; "
                f"expected {n_components} of {d}."
            )
        log_w = torch.log(init.weights / init.weights.sum()).to(x)
        means, prec = init.means.to(x), init.precisions_cholesky.to(x)
        cov = init.covariances
    else:
        seeds = _kmeans_plus_plus(x, w, n_components, generator)
        labels = _lloyd(x, w, seeds, n_lloyd)
        log_w, means, prec, cov = _m_step(
            *_hard_statistics(x, w, labels, n_components), reg_covar
        )
    previous, converged, n_iter = -math.inf, False, 0
    while n_iter < max_iter and not converged:
        n_iter += 1
        n_k, s_x, s_xx, total = _statistics(x, w, log_w, means, prec)
        mean_ll = float(total) / n
        log_w, means, prec, cov = _m_step(n_k, s_x, s_xx, reg_covar)
        converged = abs(mean_ll - previous) < tol
        previous = mean_ll
    # The returned parameters are one M-step past the last E-step: score them.
    total = _statistics(x, w, log_w, means, prec)[3]
    mean_ll = float(total) / n
    return MixtureFit(
        torch.exp(log_w), means, prec, mean_ll, _bic(float(total), n_components, d, n), n_iter,
        converged, cov,
    )


def refit_gaussian_mixture(
    fit: MixtureFit,
    x: Tensor,
    weights: Tensor | None = None,
    shrinkage: float = 0.0,
    **kwargs,
) -> MixtureFit:
    """EM started from ``fit`` on the rows ``x`` (its number of components; ``reg_covar``
    from :func:`data_reg_covar` of ``x`` unless given), then the covariances shrunk by
    ``shrinkage`` (:func:`shrink_covariances`): ``fit`` moved to other rows, or a mixture
    trained by gradient steps moved to the maximum-likelihood mixture nearest it."""
    kwargs.setdefault("reg_covar", data_reg_covar(x, weights))
    refitted = fit_gaussian_mixture(
        x, fit.n_components, weights=weights, init=fit, **kwargs
    )
    return shrink_covariances(refitted, shrinkage, x, weights)


def _bic(total: float, k: int, d: int, n: int) -> float:
    """BIC of a ``k``-component full-covariance mixture whose summed log-likelihood over
    ``n`` rows is ``total``."""
    n_params = (k - 1) + k * d * (d + 3) // 2
    return -2.0 * total + n_params * math.log(n)


def mixture_sizes(max_components: int) -> list[int]:
    """The sizes :func:`select_gaussian_mixture` tries: 1 to 10 (where a few well-separated
    clusters make the exact count matter), then about 30 % more each step (13, 17, 22, 29,
    38, 49, 64, ...), up to ``max_components``."""
    sizes, k = [], 1
    while k <= max_components:
        sizes.append(k)
        k = k + 1 if k < 10 else round(k * 1.3)
    return sizes


def log_likelihoods(fit: MixtureFit, x: Tensor) -> Tensor:
    """Log-density of each row of ``x`` under a fitted mixture, shape ``(n,)``."""
    return _row_log_likelihoods(x, torch.log(fit.weights), fit.means, fit.precisions_cholesky)


def _row_log_likelihoods(x: Tensor, log_w: Tensor, means: Tensor, prec: Tensor) -> Tensor:
    k, d = means.shape
    return torch.cat([
        logsumexp(component_log_probs(x[s], log_w, means, prec), 1)
        for s in _chunks(x.shape[0], k, d)
    ])


def mean_log_likelihood(fit: MixtureFit, x: Tensor, weights: Tensor | None = None) -> float:
    """Weighted mean log-likelihood of the rows of ``x`` under a fitted mixture."""
    return _weighted_mean(log_likelihoods(fit, x), _normalised_weights(x, weights))


def _one_standard_error_choice(fits: list, scores: list[Tensor], w: Tensor) -> MixtureFit:
    """The first (smallest) fit whose mean validation log-likelihood is within one standard
    error of the best one's, the error being that of the mean per-row difference between
    the two (rows scored by both fits, so what they share cancels)."""
    means = [_weighted_mean(v, w) for v in scores]
    top = max(range(len(fits)), key=means.__getitem__)
    for i, fit in enumerate(fits):
        mean, se = mean_and_standard_error(scores[i] - scores[top], w)
        if mean >= -se:
            return fit
    return fits[top]


def select_gaussian_mixture(
    x: Tensor,
    *,
    weights: Tensor | None = None,
    x_valid: Tensor | None = None,
    w_valid: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_components: int = 64,
    patience: int = 3,
    n_init: int = 1,
    n_folds: int = 5,
    max_cv_rows: int = 2000,
    grid: tuple[float, ...] = SHRINKAGE_GRID,
    **kwargs,
) -> MixtureFit:
    """The best of the mixtures fitted to ``x`` with :func:`mixture_sizes` components.

    The criterion is held-out log-likelihood (what a density estimate is for), with the
    one-standard-error rule: the smallest size whose mean is within one standard error of the
    best (a larger mixture more often overfits than not). Held out are the validation rows
    ``x_valid``, scored by the fit to ``x``, and where ``x`` has at most ``max_cv_rows`` rows
    (at least three of positive weight) also every row of ``x``, scored by the fit refitted
    by EM without the row's fold (``n_folds`` folds of one random order, the same for every
    size; EM starts from the fit, so that the folds rate that fit's optimum rather than fresh
    seeds', one of which can end in a poor one), each size at the covariance shrinkage of
    ``grid`` that scores its held-out rows best (:func:`shrink_covariances`;
    :func:`choose_shrinkage` then chooses the shrinkage of the kept size). A tenth of a few
    hundred rows cannot tell sizes apart: on 100 rows of two moons the ten validation rows
    kept one component in 9 of 20 draws, and the cross-validated start scores new rows
    higher by 0.17 nat per row on average (see the benchmarks). Where the fit kept scores
    the validation rows more than two standard errors below the fit that the validation rows
    alone would keep, that fit is kept instead. Without validation rows and with more than
    ``max_cv_rows`` rows the criterion is the lowest BIC.

    The search stops after ``patience`` sizes in a row without a better score, once it has
    tried at least twice the best size so far (scores can plateau: on two rings, four to
    seven components may all settle on one blurred annulus before eight or more trace the
    rings). It never tries more than ``max_components`` components nor more than one per
    ``n_features + 1`` rows (of a fold's training rows when cross-validating: fewer leave a
    full covariance singular, and its density a spike that no criterion reliably rejects).
    Sizes up to 10 (where a poor start costs most) are fitted from ``n_init`` k-means++
    starts each, keeping the likelier fit on ``x``; larger sizes from one. Other keyword
    arguments go to :func:`fit_gaussian_mixture`.
    """
    n, d = x.shape
    w_train = _normalised_weights(x, weights)
    n_rows = int((w_train > 0).sum())
    folds = min(n_folds, n_rows) if n <= max_cv_rows and n_rows >= 3 else 0
    order = None
    if folds:
        order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        fold_rows = n - -(-n // folds)  # the fewest training rows of any fold
        cap = min(max_components, max_mixture_size(fold_rows, d))
    else:
        cap = min(max_components, max_mixture_size(n, d))
    held_w = []
    if x_valid is not None:
        w_valid = _normalised_weights(x_valid, w_valid)
        held_w.append(w_valid)
    if folds:
        held_w.append(w_train)
    w_held = torch.cat(held_w) if held_w else None
    fits, per_row, valid_rows = [], [], []
    best_score, best_k, since = -math.inf, 1, 0
    for k in mixture_sizes(cap):
        starts = n_init if k <= _MULTI_START_SIZES else 1
        fit = fit_gaussian_mixture(
            x, k, weights=weights, generator=generator, n_init=starts, **kwargs
        )
        fits.append(fit)
        if w_held is None:
            score = -fit.bic
        else:
            if folds and x_valid is not None:
                valid_rows.append(_floored(log_likelihoods(fit, x_valid)))
            per_row.append(
                _held_out_scores(
                    fit, x, w_train, x_valid, w_held, order, folds, grid, generator, kwargs
                )
            )
            score = _weighted_mean(per_row[-1], w_held)
        if score > best_score:
            best_score, best_k, since = score, k, 0
        else:
            since += 1
            if since >= patience and k >= 2 * best_k:
                break
    if w_held is None:
        return min(fits, key=lambda f: f.bic)
    chosen = _one_standard_error_choice(fits, per_row, w_held)
    if folds and x_valid is not None:
        chosen = _unless_worse_on_validation(chosen, fits, valid_rows, w_valid)
    return chosen


def _floored(scores: Tensor) -> Tensor:
    """Held-out log-likelihoods with -inf and NaN (a spike's) as a finite floor whose square
    does not overflow a standard error, so that such a fit ranks last."""
    return torch.nan_to_num(scores, nan=-1e100, neginf=-1e100).clamp_min(-1e100)


def _held_out_scores(
    fit, x, w, x_valid, w_held, order, n_folds, grid, generator, kwargs
) -> Tensor:
    """Held-out log-likelihoods of ``fit``'s size for :func:`select_gaussian_mixture`: the
    validation rows' under ``fit`` (without cross-validation, unshrunk), then with
    ``n_folds`` every row of ``x`` under the fit without its fold, at the shrinkage of
    ``grid`` with the best mean."""
    if not n_folds:
        return _floored(log_likelihoods(fit, x_valid))
    held = _fold_scores(fit, x, w, order, n_folds, grid, generator, kwargs, warm=True)
    if x_valid is not None:
        held = [torch.cat([v, h]) for v, h in zip(
            _scores_by_shrinkage(x_valid, fit, grid), held, strict=True
        )]
    held = [_floored(h) for h in held]
    return max(held, key=lambda h: _weighted_mean(h, w_held))


def _unless_worse_on_validation(chosen, fits, valid_rows, w_valid) -> MixtureFit:
    """``chosen``, unless it scores the validation rows more than ``_VALIDATION_CHECK_SE``
    standard errors (of the per-row difference) below the fit the validation rows alone
    would keep."""
    by_valid = _one_standard_error_choice(fits, valid_rows, w_valid)
    if by_valid is chosen:
        return chosen
    i = next(i for i, f in enumerate(fits) if f is chosen)
    j = next(j for j, f in enumerate(fits) if f is by_valid)
    mean, se = mean_and_standard_error(valid_rows[i] - valid_rows[j], w_valid)
    return by_valid if mean < -_VALIDATION_CHECK_SE * se else chosen


def _covariances(fit: MixtureFit) -> Tensor:
    if fit.covariances is not None:
        return fit.covariances
    prec = fit.precisions_cholesky
    return torch.linalg.inv(prec @ prec.transpose(-1, -2))


def _scores_by_shrinkage(x: Tensor, fit: MixtureFit, grid) -> list[Tensor]:
    """Each row's log-likelihood under ``fit`` with its covariances shrunk by each of
    ``grid`` (:func:`shrink_covariances`)."""
    cov, log_w = _covariances(fit), torch.log(fit.weights)
    return [
        _row_log_likelihoods(x, log_w, fit.means, _precision_cholesky(_shrunk(cov, rho)))
        for rho in grid
    ]


def _shrunk(cov: Tensor, rho: float) -> Tensor:
    d = cov.shape[-1]
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / d
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (1.0 - rho) * cov + rho * scale[:, None, None] * eye


def shrink_covariances(
    fit: MixtureFit, rho: float, x: Tensor, weights: Tensor | None = None
) -> MixtureFit:
    r"""``fit`` with every covariance moved a share ``rho`` of the way to
    :math:`\frac{\operatorname{tr} \Sigma_k}{D} I` (the mean of its eigenvalues times the
    identity), rescored on the rows ``x`` it was fitted to (``log_likelihood`` and ``bic``).
    ``rho`` is in [0, 1]; 0 returns ``fit`` unchanged but for its covariances."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}.")
    cov = _covariances(fit)
    if rho == 0.0:
        return replace(fit, covariances=cov)
    cov = _shrunk(cov, rho)
    prec = _precision_cholesky(cov)
    n, d = x.shape
    w = _normalised_weights(x, weights)
    total = float((_row_log_likelihoods(x, torch.log(fit.weights), fit.means, prec) * w).sum())
    return replace(
        fit, precisions_cholesky=prec, covariances=cov, shrinkage=float(rho),
        log_likelihood=total / n, bic=_bic(total, fit.n_components, d, n),
    )


def _fold_scores(
    fit, x, w, order, n_folds, grid, generator, kwargs, warm=False
) -> list[Tensor]:
    """Each row's log-likelihood at every shrinkage of ``grid`` under a mixture of
    ``fit``'s size fitted without the row's fold (``n_folds`` folds: every ``n_folds``-th
    row of the permutation ``order``), by EM from k-means++ seeds or, ``warm``, from
    ``fit`` itself."""
    n = x.shape[0]
    scores = [x.new_empty(n) for _ in grid]
    for f in range(n_folds):
        test = order[f::n_folds]
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        keep[test] = False
        train = keep.nonzero().squeeze(1)
        if float(w[train].sum()) <= 0.0:  # every row of weight zero left out: no model
            for s in scores:
                s[test] = 0.0
            continue
        k = min(fit.n_components, int((w[train] > 0).sum()))
        init = fit if warm and k == fit.n_components else None
        part = fit_gaussian_mixture(
            x[train], k, weights=w[train], generator=generator, init=init, **kwargs
        )
        for s, fold in zip(scores, _scores_by_shrinkage(x[test], part, grid), strict=True):
            s[test] = fold
    return scores


def choose_shrinkage(
    fit: MixtureFit,
    x: Tensor,
    *,
    weights: Tensor | None = None,
    x_valid: Tensor | None = None,
    w_valid: Tensor | None = None,
    generator: torch.Generator | None = None,
    n_folds: int = 5,
    max_cv_rows: int = 2000,
    grid: tuple[float, ...] = SHRINKAGE_GRID,
    **kwargs,
) -> MixtureFit:
    r"""``fit`` (fitted to the rows ``x``) with the covariance shrinkage of ``grid`` that
    held-out rows favour (:func:`shrink_covariances`).

    The held-out rows are the validation rows ``x_valid``, scored by ``fit``, and, where
    there are no validation rows or ``x`` has at most ``max_cv_rows`` rows, every row of
    ``x`` in turn, scored by a mixture of the same size fitted by EM to the other folds
    (``n_folds``-fold cross-validation, at most one fold per row of positive weight; other
    keyword arguments go to :func:`fit_gaussian_mixture`). A few validation rows cannot
    tell a covariance fitted to 27 rows in 20 dimensions from a shrunk one (on 3 rows the
    one standard error rule kept no shrinkage, which scored test rows at -42 nats against
    -23 with the 0.3 that cross-validation chose); on many rows the folds' EM fits cost more than they tell. The
    least shrinkage within one standard error of the best mean log-likelihood is kept
    (:func:`select_gaussian_mixture`'s rule), so plentiful rows keep the maximum-likelihood
    covariances unless shrinking them is clearly better.

    With nothing to hold out (no validation rows and fewer than three rows) the covariances
    are kept where the rows outnumber the features, and replaced by their mean eigenvalue
    times the identity (``rho = 1``) where they do not.
    """
    scores, w = [x.new_empty(0) for _ in grid], x.new_empty(0)
    if x_valid is not None:
        scores = _scores_by_shrinkage(x_valid, fit, grid)
        w = _normalised_weights(x_valid, w_valid)
    w_train = _normalised_weights(x, weights)
    n_rows = int((w_train > 0).sum())
    if x_valid is None or x.shape[0] <= max_cv_rows:
        folds = min(n_folds, n_rows)
        if n_rows >= 3:  # every fold then leaves at least two rows to fit
            order = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
            cv = _fold_scores(fit, x, w_train, order, folds, grid, generator, kwargs)
            scores = [torch.cat([s, c]) for s, c in zip(scores, cv, strict=True)]
            w = torch.cat([w, w_train])
    if w.shape[0] == 0:
        # Nothing to hold out (two rows): no more rows than features leave a covariance
        # singular, whose spike no held-out row would have chosen.
        return shrink_covariances(fit, 0.0 if n_rows > x.shape[1] else 1.0, x, weights)
    # A spike can score -inf or NaN on a held-out row: rank such a shrinkage last.
    scores = [_floored(s) for s in scores]
    chosen = _one_standard_error_choice(list(grid), scores, w)
    return shrink_covariances(fit, chosen, x, weights)
