"""`RealNVPDensity`: the scikit-learn face of the Real-NVP flow."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import threading
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    DensityMixin,
    TransformerMixin,
    clone,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ._compat import (
    Interval,
    StrOptions,
    _fit_context,
    check_n_features,
    check_sample_weight,
)
from ._training import (
    evaluate_log_prob,
    fit_flow,
    fresh_noise_adder,
    gain_in_standard_errors,
    make_adam,
)
from ._utils import (
    TORCH_DTYPES,
    _row_chunks,
    cast_module,
    derive_seed,
    map_batches,
    resolve_device,
    torch_threads_at_most,
)
from .em import (
    choose_shrinkage,
    data_reg_covar,
    fit_gaussian_mixture,
    max_mixture_size,
    mean_log_likelihood,
    refit_gaussian_mixture,
    select_gaussian_mixture,
)
from .flows import RealNVPFlow, _coupling_layers, build_realnvp, clip_conditioners
from .kernel import KernelBase, fit_kernel, kernel_log_densities
from .masks import MASK_TYPES
from .mixture import GaussianMixtureBase
from .nets import ACTIVATIONS, MLP
from .piecewise import is_piecewise_linear, use_tables
from .power import SinhArcsinh, YeoJohnson, fit_marginal_maps, sinh_arcsinh, yeo_johnson
from .transforms import FlowSequential, Standardize, TriangularWhitening

__all__ = ["RealNVPDensity"]

_INFERENCE_ROWS = 65536  # most rows per inference chunk
# On CPU a chunk's activations should stay cache-sized: rows * widest layer * item size <= this
# many bytes. One 200,000-row chunk of a 64-wide flow ran 2.8x slower than 4,096-row chunks;
# 2 MiB tensors (float64 at the old limit of 2**18 values) ran up to 1.8x slower than 1 MiB
# ones, as the allocator handed them back to the system and faulted them in again
# (benchmarks/bench_compare.py, docs/benchmarks.md).
_CPU_CHUNK_BYTES = 2**20
# ... and a mixture base's (rows, components, features) residuals at most this many: one
# tensor that elementwise passes stream through, while each chunk pays fixed costs (the
# one-input conditioners' tables, the base's factors). 2-D defaults scored 1.3 to 1.6 times
# faster with residuals of 4 MiB than of 1 MiB (float64; two moons, checkerboard; 2026-12-07).
_CPU_BASE_CHUNK_BYTES = 2**22
# Training steps of fewer activations than this (rows per step times the widest layer) run
# on one of torch's threads on CPU. Below it a second thread gained nothing measurable
# (442 rows of diabetes: 43 s of wall time on one thread or two, twice the CPU time on two;
# 500 to 1,000 rows of 2-D and 10-D data: 0.93 to 1.03x), while on a machine where another
# process keeps a core busy, the threads waiting for each other at every operation slowed
# fits 3.5 to 5 times (diabetes 204 s against 51 s; 2026-12-07, AMD EPYC, 2 cores).
_THREADED_STEP_ELEMENTS = 2**13
_GLOBAL_RNG_LOCK = threading.Lock()
_MIN_GAIN_SE = 1.0  # standard errors the best epoch must beat the start by on validation
# Up to _CV_MAX_ROWS rows with positive weight (and at least 2 * couplings_cv), that gain is
# measured on every row instead, out of fold, by refitting on couplings_cv folds: a validation
# split of under 100 rows is too few to tell the trained couplings from their start (on 112
# rows of iris they were kept in 13 fits of 20 and lost 0.13 nat a row on average; out of
# fold they lost in 19 of 20). See docs/benchmarks.md, "Keeping the couplings on small data".
_CV_MAX_ROWS = 1000
_AUTO_ALPHA = 1e-3  # alpha="auto": this weight decay, or 1 / n_train where that is larger
# Rows EM sees when it starts a mixture base: at most _EM_MAX_ROWS, and fewer (down to
# _EM_MIN_ROWS) where rows * features**2 (the cost of one EM iteration per component) would
# pass _EM_BUDGET; a seeded subsample beyond that.
_EM_MAX_ROWS = 20_000
_EM_MIN_ROWS = 2_000
_EM_BUDGET = 5e7
# One EM run at a known size (the start refitted to more rows than its size was chosen on,
# and the refit after training) may cost rows * components * features**2 up to this.
_EM_REFIT_BUDGET = 5e8


def _em_row_cap(n_features: int) -> int:
    """Most rows EM sees when it fits a mixture base (see _EM_MAX_ROWS)."""
    return int(min(_EM_MAX_ROWS, max(_EM_MIN_ROWS, _EM_BUDGET / n_features**2)))


def _em_refit_rows(n_features: int, n_components: int) -> int:
    """Most rows one EM run of a mixture of ``n_components`` sees: what _EM_REFIT_BUDGET
    allows, never fewer than :func:`_em_row_cap`, at most _EM_MAX_ROWS."""
    affordable = _EM_REFIT_BUDGET / (n_components * n_features**2)
    return int(min(_EM_MAX_ROWS, max(_em_row_cap(n_features), affordable)))


def _check_hidden_layer_sizes(sizes) -> tuple[int, ...]:
    sizes = (sizes,) if isinstance(sizes, Integral) else tuple(sizes)
    if not all(isinstance(s, Integral) and s > 0 for s in sizes):
        raise ValueError(
            f"hidden_layer_sizes must be positive integers, got {sizes}."
        )
    return tuple(int(s) for s in sizes)


def _check_mask_array(mask, n_couplings: int, n_features: int) -> torch.Tensor:
    mask = np.asarray(mask)
    if mask.shape != (n_couplings, n_features):
        raise ValueError(
            f"Expected mask of shape (n_couplings, n_features) = {(n_couplings, n_features)}, "
            f"got {mask.shape}."
        )
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("Expected a binary mask (0/1 or bool), got other values.")
    mask = mask.astype(bool)
    never = np.flatnonzero(mask.all(axis=0))
    if n_features > 1 and never.size:
        raise ValueError(
            f"The mask never transforms feature(s) {never.tolist()}: every feature needs a "
            "False entry in some coupling. Use mask='fixed' to study that failure on purpose."
        )
    return torch.as_tensor(mask)


def _whitening_factor(X, sample_weight, loc, scale, reg: float = 1e-6) -> np.ndarray:
    """Lower Cholesky factor of the weighted correlation matrix of ``(X - loc) / scale``.

    ``reg`` is added to the diagonal (as GaussianMixture's ``reg_covar``), so collinear or
    fewer-rows-than-features data still have a factor; it grows tenfold until one exists.
    """
    U = (np.asarray(X, dtype=np.float64) - loc) / scale
    w = np.asarray(sample_weight, dtype=np.float64)
    w = w / w.sum()
    U = U - w @ U
    corr = (U * w[:, None]).T @ U
    corr = 0.5 * (corr + corr.T)
    eye = np.eye(len(corr))
    while True:  # ends: corr is positive semi-definite with a diagonal of at most 1
        try:
            return np.linalg.cholesky(corr + reg * eye)
        except np.linalg.LinAlgError:
            reg *= 10.0


def _standardization(X: np.ndarray, sample_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # In units of each column's largest magnitude, so that sums and squares of values near the
    # float64 (or float32) limit do not overflow.
    unit = np.max(np.abs(X), axis=0).astype(np.float64)
    unit = np.where(unit > 0, unit, 1.0)
    X = X / unit
    loc = np.average(X, axis=0, weights=sample_weight)
    var = np.average((X - loc) ** 2, axis=0, weights=sample_weight)
    loc, scale = loc * unit, np.sqrt(var) * unit
    tiny = ~(scale > 1e-12 * np.maximum(np.abs(loc), 1.0))
    if tiny.any():
        warnings.warn(
            f"Feature(s) {np.flatnonzero(tiny).tolist()} are (nearly) constant: their density "
            "is degenerate and the fitted log-likelihood can grow without bound. Drop them or "
            "add noise.",
            UserWarning,
            stacklevel=4,
        )
        scale = np.where(tiny, 1.0, scale)
    return loc, scale


_INPUT_ATTRS = ("n_features_in_", "feature_names_in_")
# Parameters added after models were first pickled, and what a model fitted before each
# did (see RealNVPDensity.__setstate__): unclipped conditioners, no refit of the base after
# training, no out-of-fold check, no Yeo-Johnson layer, no tail weights.
_OFF_WHEN_FITTED = {
    "clip_conditioner_inputs": False, "refit_base": False, "couplings_cv": None,
    "power_transform": None, "heavy_tails": False,
}


def _undo_input_attrs_on_error(fit_method):
    """Make a failing fit leave ``n_features_in_`` and ``feature_names_in_`` as they were.

    ``validate_data(reset=True)`` sets them before the data-dependent checks (mask shape,
    device, validation split) and before training; without this a failing refit leaves a model
    whose ``n_features_in_`` no longer matches its flow, and a failing first fit looks fitted.
    """

    @functools.wraps(fit_method)
    def wrapper(self, *args, **kwargs):
        names = getattr(self, "_input_attrs", _INPUT_ATTRS)
        saved = {k: vars(self)[k] for k in names if k in vars(self)}
        try:
            return fit_method(self, *args, **kwargs)
        except BaseException:
            for k in names:
                vars(self).pop(k, None)
            vars(self).update(saved)
            raise

    return wrapper


def _outside_inference_mode(fit_method):
    """Run a fit with torch's inference mode off: a fit called inside
    ``torch.inference_mode()`` would otherwise make the flow's tensors inference tensors,
    which keep no version counter, and the fitted estimator could not score afterwards."""

    @functools.wraps(fit_method)
    def wrapper(self, *args, **kwargs):
        with torch.inference_mode(False):
            return fit_method(self, *args, **kwargs)

    return wrapper


def _check_training_range(X: np.ndarray, dtype: str) -> None:
    """Refuse data whose deviations from their mean float32 training cannot hold (training
    in float32 sees the rows minus the standardisation's centre, taken in float64)."""
    if dtype != "float32":
        return
    with np.errstate(over="ignore", invalid="ignore"):  # per column: no copy of X
        mean = np.mean(X, axis=0, dtype=np.float64)
        big = float(np.max(np.maximum(X.max(axis=0) - mean, mean - X.min(axis=0)), initial=0.0))
    limit = float(np.finfo(np.float32).max)
    if not big <= limit:
        raise ValueError(
            f"X deviates from its mean by up to {big:.3g}, beyond the float32 range "
            f"({limit:.3g}) used for training: pass dtype='float64' or rescale X."
        )


def _leading_standardize(module: torch.nn.Module) -> Standardize | None:
    """The flow's first layer if it is a :class:`Standardize`, else None."""
    layers = getattr(module, "transform", None)
    if isinstance(layers, torch.nn.Sequential) and len(layers) and isinstance(
        layers[0], Standardize
    ):
        return layers[0]
    return None


def _fixed_buffer(module: torch.nn.Module, layer_type: type, name: str) -> np.ndarray | None:
    """Buffer ``name`` of the flow's first ``layer_type`` layer (a copy), None without
    one."""
    layer = next((m for m in module.modules() if isinstance(m, layer_type)), None)
    return None if layer is None else getattr(layer, name).detach().cpu().numpy().copy()


def _power_transform(X, sample_weight, tails: bool = False) -> tuple | None:
    """The per-feature map for ``X`` (float64 tensors): ``(loc, scale, lmbda)`` of its
    standardisation and Yeo-Johnson exponents, followed with ``tails`` by ``(tail_loc,
    tail_scale, delta)``, the second standardisation and the tail weights, where some
    feature has one (:func:`~sknvp.power.fit_marginal_maps`); None where the map would
    be the identity."""
    with warnings.catch_warnings():  # the flow's own standardisation gives them
        warnings.simplefilter("ignore", UserWarning)
        loc, scale = _standardization(X, sample_weight)
    lmbda, tail_loc, tail_scale, delta = fit_marginal_maps(
        torch.as_tensor((X - loc) / scale), torch.as_tensor(sample_weight), tails=tails
    )
    power = (torch.as_tensor(loc, dtype=torch.float64),
             torch.as_tensor(scale, dtype=torch.float64), lmbda)
    if bool((delta == 1.0).all()):
        return None if bool((lmbda == 1.0).all()) else power
    return (*power, tail_loc, tail_scale, delta)


_MAP_NAMES = ("plain", "Yeo-Johnson", "tail-weighted")


def _exponents_only(power: tuple) -> tuple | None:
    """The Yeo-Johnson part of the map ``power`` of :func:`_power_transform`, without the
    features that have a tail weight: an exponent alone stretches one of a feature's two
    tails polynomially, which on a heavy tail puts far rows at absurd log-densities (a
    Cauchy's exponent of 2 scored held-out rows at -838 on average). None if nothing is
    left."""
    if len(power) == 3:
        return power
    loc, scale, lmbda, _, _, delta = power
    lmbda = torch.where(delta < 1.0, torch.ones_like(lmbda), lmbda)
    return None if bool((lmbda == 1.0).all()) else (loc, scale, lmbda)


def _map_at(power: tuple | None, level: int) -> tuple | None:
    """The map ``power`` of :func:`_power_transform` at ``level``: none (0), the
    Yeo-Johnson exponents (1; :func:`_exponents_only`), all of it (2)."""
    if level == 0 or power is None:
        return None
    return power if level == 2 else _exponents_only(power)


def _same_map(a: tuple | None, b: tuple | None) -> bool:
    """Whether two maps of :func:`_power_transform` are the same (both None included)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def _marginal_rows(X: np.ndarray, power: tuple) -> np.ndarray:
    """The rows of ``X`` after the map ``power`` of :func:`_power_transform` (float64)."""
    loc, scale, lmbda = power[:3]
    z = (torch.as_tensor(X, dtype=torch.float64) - loc) / scale
    y = yeo_johnson(z, lmbda)[0]
    if len(power) > 3:
        tail_loc, tail_scale, delta = power[3:]
        y = sinh_arcsinh((y - tail_loc) / tail_scale, delta)[0]
    return y.numpy()


def _feature_axes(start, row: torch.Tensor) -> torch.Tensor:
    """The features' axes in the coordinates the untrained flow ``start`` hands its base:
    the Jacobian of its (affine) map, scaled to its largest entry. After a Yeo-Johnson or
    tail layer, the features are that layer's outputs (the map after it is affine)."""
    layers = list(start.transform)
    first = max(
        (i + 1 for i, m in enumerate(layers) if isinstance(m, (YeoJohnson, SinhArcsinh))),
        default=0,
    )
    if first:
        row = FlowSequential(*layers[:first])(row)[0]
    tail = FlowSequential(*layers[first:])
    A = torch.autograd.functional.jacobian(lambda v: tail(v[None])[0][0], row[0]).detach()
    return A / A.abs().max()


def _zero_centre(module: torch.nn.Module) -> None:
    """Move the centre of the flow's leading standardisation to 0 (for centred rows)."""
    _leading_standardize(module).loc.zero_()


class RealNVPDensity(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, DensityMixin, BaseEstimator
):
    r"""Density estimation with a Real-NVP normalizing flow.

    The flow is a stack of affine coupling layers (Dinh et al., 2016) on a base density: by
    default a trainable Gaussian mixture that starts as the mixture EM fits to the training
    rows, or the paper's standard normal (``base="normal"``). Features are standardised inside
    the flow, and that map's log-determinant is part of every log-density, so
    :meth:`score_samples` returns log-densities in the units of ``X``.

    Read more in the :ref:`User Guide <user_guide>`.

    Parameters
    ----------
    n_couplings : int, default=8
        Number of affine coupling layers.
    hidden_layer_sizes : tuple of int, default=(128, 128)
        Hidden widths of each coupling's conditioner network, which outputs the log-scale and
        the shift together; the tuple's length is its depth.
    activation : {"relu", "leaky_relu", "tanh", "elu", "gelu", "silu"}, default="relu"
        Activation of the conditioner networks.
    mask : str or array-like of shape (n_couplings, n_features), default="permuted"
        Which features each coupling keeps fixed (and conditions on). ``"permuted"`` keeps the
        two halves of the features in turn, in index order for the first two couplings and
        then of a new random permutation (seeded by ``random_state``) for every later pair,
        so each feature is conditioned on changing partners; with two features it is the
        same as ``"alternating"``, which keeps the first and second half in turn;
        ``"checkerboard"`` keeps odd and even indices in turn; ``"random"`` an independent
        seeded random half per coupling (a feature may then never be transformed); and
        ``"fixed"`` always the first half, so those features are never transformed (kept to
        reproduce why that fails). Which partners help depends on the order of the columns
        (halves suit ``[x, f(x)]`` layouts, even/odd neighbouring columns); the permutations
        do not bet on an order: on tabular data they scored up to 1.5 nats per row above the
        halves (5.3 on 64-D digits) and at most 0.05 below (see the benchmarks). An
        array-like of shape ``(n_couplings, n_features)`` with ``1`` = kept gives the masks
        explicitly; each feature must be transformed by some coupling.
    batch_norm : bool, default=False
        Insert batch normalisation layers (with their log-determinant) between couplings, as in
        the paper. They use batch statistics in training and running averages afterwards.
    base : {"mixture", "normal"}, default="mixture"
        Density of the couplings' output. ``"mixture"``: a mixture of ``n_components``
        full-covariance Gaussians, fitted by EM to the standardised training rows before the
        couplings are trained (so the untrained flow is that Gaussian mixture), then trained
        with them by maximum likelihood. ``"normal"``: a standard normal, as in the paper.
        Either way :meth:`transform` maps to a standard normal latent space: with a mixture it
        ends with the mixture's Rosenblatt transform (its conditional CDFs, one feature at a
        time). On the 2-D benchmark sets the defaults scored 0.02 to 0.37 nat per row higher
        with the mixture base than with the standard normal, and it fits multimodal data that
        a flow from one Gaussian must squeeze into thin bridges (see the benchmarks). On
        discrete features (integer levels, flags) EM can give a component almost no width
        around one value, as :class:`~sklearn.mixture.GaussianMixture` does: rows off those
        values then score very low; dequantise such features (add uniform noise) first.
    n_components : int or "auto", default="auto"
        Number of mixture components with ``base="mixture"``; ``"auto"`` fits mixtures of
        1 to 10, 13, 17, 22, 29, 38, 49 and 64 components (at most one per
        ``n_features + 1`` training rows) and keeps the one with the best held-out
        log-likelihood: on the validation rows and, with at most 2,000 training rows, on
        every training row by five-fold cross-validation (by BIC without ``early_stopping``
        on more rows), stopping after three sizes in a row without a better one once it has
        tried twice the best size (:func:`sknvp.em.select_gaussian_mixture`). Either way
        the covariances are then shrunk towards multiples of the identity as far as
        held-out rows favour (the validation rows, and folds of the training rows when there
        are at most 2,000 or no validation rows; :func:`sknvp.em.choose_shrinkage`), so that
        few rows in many dimensions do not leave a near-singular covariance. EM sees at
        most 20,000 training rows (fewer with many features: rows x features\ :sup:`2` at
        most 5e7, but at least 2,000 rows), subsampled with the seed, and honours
        ``sample_weight``. Ignored with ``base="normal"``.
    refit_base : bool, default=True
        With ``base="mixture"`` and ``early_stopping``, refit the trained mixture by EM
        (started from it) to the rows as the fitted couplings map them, training and
        validation rows together, so that the base also learns from the rows early stopping
        held out. Where training moved the couplings, this is done only if EM on the training
        rows alone scores the validation rows higher than the trained mixture (on 30-D breast
        cancer it did not: EM's covariances fitted the mapped training rows too closely);
        where no epoch beat the EM start, the fitted model is that Gaussian mixture and it is
        always refitted. The covariances keep the shrinkage chosen for the EM start. It gave
        +2.1 nats per row on 64-D digits and +0.5 to 1.2 on a 128-D mixture of 1,500 rows
        (see the benchmarks). ``best_validation_score_`` is the score before the refit, whose
        EM has seen the validation rows. Fresh fits only (not :meth:`partial_fit` or a
        ``warm_start`` refit). False keeps the trained mixture.
    whiten : bool or "auto", default="auto"
        Start the flow with a fixed full-covariance whitening (the Cholesky factor of the
        training rows' correlation matrix, :class:`~sknvp.transforms.TriangularWhitening`)
        after the per-feature standardisation, so the couplings start from a full-covariance
        Gaussian instead of a diagonal one. It pays on strongly correlated tabular data with
        few rows and can hurt elsewhere (see the benchmarks in the documentation). ``"auto"``
        fits the flow both ways and keeps the one with the better validation log-likelihood,
        which doubles the fit time; it does so only with ``early_stopping`` (which provides the
        validation rows), 3 or more features and ``base="normal"``: in 1 or 2 dimensions one
        coupling can represent the whitening itself, and a mixture base's full covariances
        already start the flow from a full-covariance model, so ``"auto"`` does not whiten
        there.
    power_transform : {"auto", "yeo-johnson"} or None, default="auto"
        Start the flow with a fixed Yeo-Johnson power transform of each standardised feature
        (:class:`~sknvp.power.YeoJohnson`, followed by a second standardisation). Affine
        couplings are affine in the features they transform, so they reshape a skewed
        marginal (amounts, sizes, concentrations) only poorly; this map draws in its long
        tail first. Each feature's exponent is its maximum-likelihood one in :math:`[0, 2]`
        (a Gaussian after the transform), kept where it beats the identity by the BIC's
        price of one parameter (:func:`~sknvp.power.fit_yeo_johnson`); features without a
        significant skew are left as they are. ``"auto"`` builds the flow's start both ways
        and keeps the transform only if it scores held-out rows at least one standard error
        higher (paired per row): with at most 1,000 rows (and ``couplings_cv``) every row,
        in ``couplings_cv`` folds scored by the starts built without them, else the
        validation rows. It needs ``early_stopping`` and costs a second fit of the start's
        mixture (ten more on folds), and a third where some feature has a tail weight
        (``heavy_tails``). ``"yeo-johnson"`` always uses it, None
        never. The log-density includes the map's log-derivative, so it stays a density in
        the units of ``X``.
    heavy_tails : bool, default=True
        With ``power_transform``, let the per-feature map also draw in heavy tails: a
        sinh-arcsinh tail weight :math:`\delta \in [0, 1]` per standardised feature after
        its exponent (:class:`~sknvp.power.SinhArcsinh`, :math:`u \mapsto \sinh(\delta
        \operatorname{asinh} u) / \delta`, identity at 1). A flow of affine couplings on
        a Gaussian base has Gaussian-like tails whatever its weights, so it scores
        Student-t or Cauchy-like features (returns, ratios, measurement outliers) far below
        their density. A weight is kept where it beats the exponent alone by the BIC's price
        (:func:`~sknvp.power.fit_marginal_maps`). ``"auto"`` judges the exponents first,
        without the features that have a tail weight (an exponent alone stretches one of a
        heavy tail's two sides polynomially), then the tail weights against the start it
        kept, each on held-out rows as above (one more fit of the start's mixture).
    scale_bound : float, default=2.0
        Soft bound on each coupling's log-scale: :math:`s = \beta\tanh(\tilde s/\beta)`.
    max_iter : int, default=150
        Maximum number of epochs.
    batch_size : int or "auto", default="auto"
        Rows per optimisation step; ``"auto"`` uses ``n_train // 16`` clipped to [16, 512]
        (at least ~16 steps per epoch on small data).
    learning_rate_init : float, default=1e-3
        Adam's initial learning rate.
    learning_rate : {"cosine", "constant"}, default="cosine"
        Learning-rate schedule over the ``max_iter`` epochs.
    alpha : float or "auto", default="auto"
        L2 penalty (Adam weight decay) on the couplings' parameters; a mixture base's
        parameters are not decayed. Weight decay keeps the couplings close to the identity
        where the training rows do not pull them away, so the fitted density does not bend
        beyond the data (very heavy tails) and small data overfit less; 0 switches it off.
        ``"auto"`` uses ``max(1e-3, 1 / n_train)`` for ``n_train`` training rows (those of
        the call, with :meth:`partial_fit`): on fewer than 1,000 rows, the penalty of a
        standard normal prior on the weights against the summed log-likelihood (the loss is
        the mean per row, so the prior's share grows as the rows get fewer). On 40 rows of
        two moons it kept one fit in eight from tearing holes 47 nats deep at the 1st
        percentile of new rows (see the benchmarks).
    input_noise : float, default=0.0
        Standard deviation of Gaussian noise added afresh to every training minibatch, in
        units of each feature's standard deviation (noise regularisation). It smooths the
        fitted density, at the price of widening it by that much noise. On small 2-D data it
        made the "holes" a flow can tear between training rows rare and shallow (a held-out
        row in one can score thousands of nats below the rest); on real tabular data its
        effect went either way, so check it on held-out rows. Validation rows are scored as
        given. 0.05 is a reasonable value to try; see the benchmarks in the documentation.
    clip_conditioner_inputs : bool, default=True
        After fitting, clip each coupling's conditioner input to the range of values the
        fitted rows gave it (:func:`sknvp.flows.clip_conditioners`). Nothing changes on the
        training rows or wherever the conditioners' inputs stay within those ranges; beyond
        them a coupling keeps the scale and shift of the nearest point of the range instead
        of extrapolating its network, so a row far out along a few features is not
        stretched by every coupling (a held-out 64-D digit with one pixel 29 standard
        deviations out scored -11,619 unclipped and -731 clipped; a Gaussian mixture gave it
        -710). The flow stays invertible and its density still integrates to one. False
        keeps the networks' own extrapolation (the paper's model). It takes effect when
        fitting (the ranges are part of ``module_``); :meth:`partial_fit` widens them with
        each chunk.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the rows, stop when their log-likelihood stops
        improving and restore the best weights, unless they beat the weights training
        started from (the Gaussian mixture the couplings start on, by default) by less than
        one standard error of the per-row difference on those rows: the best of many epochs'
        scores is biased upwards against the start's one score, and then the start is kept
        (``best_validation_score_`` is its score, below some of ``validation_scores_``).
        On at most 1,000 rows that choice is made out of fold instead (``couplings_cv``).
    validation_fraction : float, default=0.1
        Fraction of rows held out when ``early_stopping`` is on.
    couplings_cv : int or None, default=5
        With ``early_stopping`` and 2 x ``couplings_cv`` to 1,000 rows of positive weight, a
        validation split is too small to tell trained couplings from their start, and every
        row takes part instead: the fit (at the whitening and mixture size it chose) is
        repeated without each of ``couplings_cv`` folds of the rows, and the trained
        couplings are kept only if they score the held-out rows at least one standard error
        above each refit's own start. That takes about ``couplings_cv`` times as long as one
        fit. With ``n_components="auto"``, the same folds then rate a kernel density
        estimate (:mod:`sknvp.kernel`) of the rows in the coordinates the untrained flow
        hands its base: if it scores the held-out rows a standard error above the flow so
        kept, the fitted flow is the untrained one with that estimate on every row as its
        base (``kernel_bandwidth_``). ``None`` leaves the decision to the validation split,
        as on more rows, and never uses a kernel base.
    n_iter_no_change : int, default=20
        Epochs without an improvement of at least ``tol`` before stopping. A plateau
        reached while the learning rate is still above a tenth of ``learning_rate_init``
        does not stop training: the best weights so far are restored, the learning rate is
        divided by 10 for the rest of the fit, and the count starts again (at most once per
        :meth:`fit`).
    tol : float, default=1e-4
        Minimum improvement (nats per sample) that counts.
    warm_start : bool, default=False
        Reuse the fitted flow and optimizer state as the start of the next :meth:`fit`. A
        flow with a kernel base (``kernel_bandwidth_`` set) is fitted afresh instead, with a
        warning: training would fit the kernels to the rows they are centred on.
    verbose : int, default=0
        Print one line per epoch when positive.
    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation, random masks, the mixture base's EM start (its seeding
        and row subsample), the validation split and minibatch order. The global torch random
        state is never touched.
    device : str, default="auto"
        Where to train: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:1"``, ``"mps"``.
    dtype : {"float32", "float64"}, default="float32"
        Floating-point type used for training. In float32 the rows are centred in float64
        before the cast (the centre stays float64), so large offsets cost no precision.
    inference_dtype : {"float64", "float32"}, default="float64"
        Floating-point type of scoring, transforms and sampling. In float64 results do not
        depend on how rows are batched (to ~1e-12), as scikit-learn's estimator checks ask.
        ``"float32"`` is 2-4x faster on CPU and gives the same numbers to about 1e-6
        relative, but a row's score can change in the last digits with the other rows it is
        scored with. Outputs are float64 arrays either way.

    Attributes
    ----------
    module_ : sknvp.flows.RealNVPFlow
        The fitted torch flow (float64, on ``device_``), usable on its own. Inference in
        float32 uses a cached float32 copy, refreshed whenever its weights change.
    device_ : torch.device
        Device the flow lives on.
    whiten_ : bool
        Whether the fitted flow starts with the full-covariance whitening (what ``"auto"``
        chose).
    power_lambdas_ : ndarray of shape (n_features_in_,) or None
        Exponents of the fitted flow's Yeo-Johnson transform (1 leaves a feature as it is);
        None where the flow has none (``power_transform``).
    tail_weights_ : ndarray of shape (n_features_in_,) or None
        Tail weights of the fitted flow's sinh-arcsinh layer (1 leaves a feature as it is);
        None where the flow has none (``heavy_tails``).
    n_components_ : int or None
        Number of components of the fitted mixture base (what ``"auto"`` chose; with a
        kernel base, the number of rows of positive weight); None with ``base="normal"``.
    kernel_bandwidth_ : float or None
        Bandwidth :math:`h`, relative to the rows' covariance, of the kernel density
        estimate that is the fitted flow's base, where the out-of-fold check chose one
        (``couplings_cv``); None otherwise.
    kernel_shape_ : {"full", "diagonal", "spherical"} or None
        Shape of that estimate's kernels (:mod:`sknvp.kernel`: the rows' covariance, its
        diagonal, or a multiple of the identity in the features' units); None without one.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of features seen during fit, when ``X`` has string column names.
    loss_curve_ : list of float
        Mean training negative log-likelihood per epoch (standardised units plus constant).
    validation_scores_ : list of float
        Mean validation log-likelihood per epoch (empty without early stopping).
    best_validation_score_ : float or None
        Best validation log-likelihood, whose weights were kept; None without early stopping.
    n_iter_ : int
        Number of epochs run (summed over warm-started fits).
    converged_ : bool
        Whether the stopping rule fired before ``max_iter``.
    lr_drops_ : list of int
        Epochs (0-based, counted within the last :meth:`fit`) at which a plateau divided the
        learning rate by 10 (see ``n_iter_no_change``).

    See Also
    --------
    sklearn.neighbors.KernelDensity : Kernel density estimation.
    sklearn.mixture.GaussianMixture : Gaussian mixture density.

    Notes
    -----
    :meth:`score` returns the *mean* log-likelihood per sample, like
    :class:`~sklearn.mixture.GaussianMixture` (``KernelDensity`` returns the sum). Do not put a
    :class:`~sklearn.preprocessing.StandardScaler` before it in a pipeline: the pipeline would
    report densities of the scaled data; standardisation is already done inside, with its
    Jacobian.

    References
    ----------
    .. [1] L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP",
       ICLR 2017, https://arxiv.org/abs/1605.08803

    Examples
    --------
    >>> from sklearn.datasets import make_moons
    >>> from sknvp import RealNVPDensity
    >>> X, _ = make_moons(500, noise=0.05, random_state=0)
    >>> est = RealNVPDensity(n_couplings=4, max_iter=20, random_state=0).fit(X)
    >>> est.score_samples(X[:3]).shape
    (3,)
    >>> est.sample(5, random_state=0).shape
    (5, 2)
    """

    _parameter_constraints: dict = {
        "n_couplings": [Interval(Integral, 1, None, closed="left")],
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(ACTIVATIONS)), callable],
        "mask": [StrOptions(set(MASK_TYPES)), "array-like"],
        "batch_norm": ["boolean"],
        "base": [StrOptions({"mixture", "normal"})],
        "n_components": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "refit_base": ["boolean"],
        "whiten": ["boolean", StrOptions({"auto"})],
        "power_transform": [StrOptions({"auto", "yeo-johnson"}), None],
        "heavy_tails": ["boolean"],
        "scale_bound": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "learning_rate": [StrOptions({"cosine", "constant"})],
        "alpha": [Interval(Real, 0, None, closed="left"), StrOptions({"auto"})],
        "input_noise": [Interval(Real, 0, None, closed="left")],
        "clip_conditioner_inputs": ["boolean"],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "couplings_cv": [Interval(Integral, 2, None, closed="left"), None],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "dtype": [StrOptions(set(TORCH_DTYPES))],
        "inference_dtype": [StrOptions(set(TORCH_DTYPES))],
    }

    def __init__(
        self,
        *,
        n_couplings=8,
        hidden_layer_sizes=(128, 128),
        activation="relu",
        mask="permuted",
        batch_norm=False,
        base="mixture",
        n_components="auto",
        refit_base=True,
        whiten="auto",
        power_transform="auto",
        heavy_tails=True,
        scale_bound=2.0,
        max_iter=150,
        batch_size="auto",
        learning_rate_init=1e-3,
        learning_rate="cosine",
        alpha="auto",
        input_noise=0.0,
        clip_conditioner_inputs=True,
        early_stopping=True,
        validation_fraction=0.1,
        couplings_cv=5,
        n_iter_no_change=20,
        tol=1e-4,
        warm_start=False,
        verbose=0,
        random_state=None,
        device="auto",
        dtype="float32",
        inference_dtype="float64",
    ):
        self.n_couplings = n_couplings
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.mask = mask
        self.batch_norm = batch_norm
        self.base = base
        self.n_components = n_components
        self.refit_base = refit_base
        self.whiten = whiten
        self.power_transform = power_transform
        self.heavy_tails = heavy_tails
        self.scale_bound = scale_bound
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.input_noise = input_noise
        self.clip_conditioner_inputs = clip_conditioner_inputs
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.couplings_cv = couplings_cv
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.verbose = verbose
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.inference_dtype = inference_dtype

    # ------------------------------------------------------------------ fitting

    def _check_params(self, n_features: int) -> tuple:
        """Data-dependent parameter checks; returns (hidden sizes, explicit mask or None)."""
        sizes = _check_hidden_layer_sizes(self.hidden_layer_sizes)
        mask = None
        if not isinstance(self.mask, str):
            mask = _check_mask_array(self.mask, self.n_couplings, n_features)
        elif self.mask == "fixed" and n_features > 1:
            warnings.warn(
                "mask='fixed' keeps the same features in every coupling, so they are never "
                "transformed: only the base density models them (with base='normal' their "
                "marginal stays Gaussian). Use 'permuted' (the default) or 'alternating' "
                "unless you study this failure.",
                UserWarning,
                stacklevel=3,
            )
        return sizes, mask

    def _candidate_specs(self, spec: tuple, n_features: int) -> list[tuple]:
        """Hook: the model specifications ``fit`` trains and picks from by validation score.

        ``spec`` is what :meth:`_check_params` returned; each candidate is the tail of the
        arguments of :meth:`_build_module` (here: ``(sizes, mask, whiten)``).
        """
        if self.whiten == "auto":
            compare = self.early_stopping and n_features >= 3 and self.base == "normal"
            return [(*spec, False), (*spec, True)] if compare else [(*spec, False)]
        return [(*spec, bool(self.whiten))]

    def _build_module(
        self, X, sample_weight, sizes, mask, whiten, seed: int, valid=None
    ) -> RealNVPFlow:
        """Build a fresh flow for ``X`` (subclasses override for other architectures);
        ``valid``, the validation rows and weights if any, may guide the build: with
        ``power_transform="auto"`` they choose the per-feature map: the start with the
        Yeo-Johnson exponents against the plain one, then, where some feature has a tail
        weight, the start with the weights too against the one kept
        (:meth:`_power_transform_gain`)."""
        power = None
        if self.power_transform is not None:
            power = _power_transform(X, sample_weight, self.heavy_tails)
        if power is None or (self.power_transform == "auto" and valid is None):
            return self._build_flow(X, sample_weight, sizes, mask, whiten, seed, valid)
        if self.power_transform != "auto":
            return self._build_flow(X, sample_weight, sizes, mask, whiten, seed, valid, power)
        # Nested: the exponents against the plain start, then the tails against the winner.
        spec = (sizes, mask, whiten)
        steps = [(1, _exponents_only(power))]
        if len(power) > 3:
            steps.append((2, power))
        level, kept, flow, prebuilt = 0, None, None, None
        for candidate, candidate_map in steps:
            if candidate_map is None:  # no exponent passes: the tails face the plain start
                continue
            z, where, built = self._power_transform_gain(
                X, sample_weight, spec, seed, valid, (candidate_map, kept), (candidate, level),
                prebuilt,
            )
            use = z >= _MIN_GAIN_SE
            if self.verbose:
                what = "Yeo-Johnson" if candidate == 1 else "tail-weighted"
                print(f"{what} start against the {_MAP_NAMES[level]} one, {where}: {z:+.2f} "
                      f"standard errors; {'transform' if use else 'none'} kept")
            if use:
                level, kept = candidate, candidate_map
            flow, prebuilt = None, None
            if built is not None:
                prebuilt = built[use]
                flow, shrinkage = prebuilt
                if shrinkage is not None:
                    self._start_shrinkage = shrinkage
        if flow is not None:
            return flow
        return self._build_flow(X, sample_weight, sizes, mask, whiten, seed, valid, kept)

    def _power_transform_gain(
        self, X, sample_weight, spec, seed: int, valid, maps, levels, prebuilt=None
    ):
        """How many standard errors (paired per row) the start with the per-feature map
        ``maps[0]`` scores held-out rows above the start with ``maps[1]`` (None: plain),
        where they were held out, and the two starts of ``X`` with their shrinkage
        (``{False: maps[1]'s, True: maps[0]'s}``) if building them was part of it
        (``prebuilt``, if given, is ``maps[1]``'s, built before). On at
        most ``_CV_MAX_ROWS`` rows (``X`` and the validation rows) the rows are
        ``couplings_cv`` folds, each scored by the starts built without it, the maps chosen
        again there at their ``levels`` (see :func:`_map_at`); on more, or without
        ``couplings_cv``, they are the validation rows."""
        rows = np.concatenate([X, valid[0]])
        weights = np.concatenate([sample_weight, valid[1]])
        positive = np.flatnonzero(weights > 0)
        if self.couplings_cv is None or not (
            2 * self.couplings_cv <= len(positive) <= _CV_MAX_ROWS
        ):
            built = {} if prebuilt is None else {False: prebuilt}
            for use in (True, False):
                if use in built:
                    continue
                with warnings.catch_warnings():
                    if not use:  # the data's warnings came with the first build
                        warnings.simplefilter("ignore", UserWarning)
                    flow = self._build_flow(
                        X, sample_weight, *spec, seed, valid, maps[0] if use else maps[1]
                    )
                built[use] = (flow, vars(self).get("_start_shrinkage"))
            x = torch.as_tensor(valid[0], dtype=torch.float64)
            w = torch.as_tensor(valid[1], dtype=torch.float64)
            with torch.no_grad():
                z = gain_in_standard_errors(
                    evaluate_log_prob(built[True][0], x), evaluate_log_prob(built[False][0], x), w
                )
            return z, "on the validation rows", built
        folds, _ = self._folds(positive, seed)
        with warnings.catch_warnings():  # the data's warnings come with the final build
            warnings.simplefilter("ignore", UserWarning)
            try:
                gains = self._fold_gains(rows, weights, folds, spec, seed, levels)
            except (ValueError, RuntimeError):  # a fold's start failed: keep the simpler flow
                return -math.inf, "out of fold (a fold failed)", None
        gain = torch.cat(gains)
        held_w = torch.as_tensor(weights[np.concatenate(folds)], dtype=torch.float64)
        z = gain_in_standard_errors(gain, torch.zeros_like(gain), held_w)
        return z, "out of fold", None

    def _folds(self, rows: np.ndarray, seed: int) -> tuple[list, np.random.RandomState]:
        """``rows`` in ``couplings_cv`` folds of one seeded random order, and the generator
        that drew it (for draws that follow)."""
        rng = np.random.RandomState(seed % 2**32)
        return np.array_split(rows[rng.permutation(len(rows))], self.couplings_cv), rng

    def _fold_gains(self, rows, weights, folds, spec, seed, levels) -> list[torch.Tensor]:
        """For each fold, its rows' log-densities under the start with the per-feature map
        at ``levels[0]`` of the other folds' rows minus those under the start with the map
        at ``levels[1]`` (see :func:`_map_at`)."""
        gains = []
        for k, held in enumerate(folds):
            other = np.concatenate(folds[:k] + folds[k + 1:])
            x_o, w_o = rows[other], weights[other]
            x = torch.as_tensor(rows[held], dtype=torch.float64)
            fold_power = _power_transform(x_o, w_o, self.heavy_tails)
            fold_map, fold_reference = (_map_at(fold_power, level) for level in levels)
            if _same_map(fold_map, fold_reference):  # the same start: no gain, nothing built
                gains.append(torch.zeros(len(x), dtype=torch.float64))
                continue
            reference = self._build_flow(x_o, w_o, *spec, seed, None, fold_reference)
            powered = self._build_flow(x_o, w_o, *spec, seed, None, fold_map)
            with torch.no_grad():
                gains.append(evaluate_log_prob(powered, x) - evaluate_log_prob(reference, x))
        return gains

    def _build_flow(
        self, X, sample_weight, sizes, mask, whiten, seed: int, valid=None, power=None
    ) -> RealNVPFlow:
        """The flow of :meth:`_build_module`, with the Yeo-Johnson map ``power`` (its
        standardisation's ``(loc, scale)`` and exponents, see :func:`_power_transform`)
        first if given."""
        rows = X if power is None else _marginal_rows(X, power)
        loc, scale = _standardization(rows, sample_weight)
        whitening = None
        if whiten and X.shape[1] > 1:
            whitening = torch.as_tensor(
                _whitening_factor(rows, sample_weight, loc, scale), dtype=torch.float64
            )
        gen = torch.Generator().manual_seed(seed)
        # Layer constructors draw from torch's global RNG: fork it (so the user's stream is
        # untouched) under a lock (so fits in concurrent threads cannot interleave seeds).
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            flow = build_realnvp(
                X.shape[1],
                n_couplings=self.n_couplings,
                hidden_layer_sizes=sizes,
                activation=self.activation,
                mask=mask if mask is not None else self.mask,
                batch_norm=self.batch_norm,
                scale_bound=self.scale_bound,
                loc=torch.as_tensor(loc, dtype=torch.float64),
                scale=torch.as_tensor(scale, dtype=torch.float64),
                whitening=whitening,
                generator=gen,
                power=power,
            ).double()
        if self.base == "mixture":
            flow.base = self._initial_base(flow, X, sample_weight, seed, valid)
        return flow

    def _initial_base(self, flow, X, sample_weight, seed: int, valid) -> GaussianMixtureBase:
        """The mixture EM fits to the rows as the untrained flow maps them (the couplings
        start as the identity, so that is the standardisation, and the whitening if any);
        its size is the one whose fit scores best on the validation rows, if any."""
        n, d = X.shape
        cap = _em_row_cap(d)
        rows = np.arange(n)
        if n > cap:
            rows = np.sort(np.random.RandomState(seed).choice(n, cap, replace=False))

        def mapped(A):
            with torch.no_grad():
                return flow.transform(torch.as_tensor(A, dtype=torch.float64))[0]

        U = mapped(X[rows])
        weights = torch.as_tensor(sample_weight[rows], dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        reg_covar = data_reg_covar(U, weights)
        U_valid = w_valid = None
        if valid is not None:
            U_valid = mapped(valid[0])
            w_valid = torch.as_tensor(valid[1], dtype=torch.float64)
        if self.n_components == "auto":
            fit = select_gaussian_mixture(
                U, weights=weights, x_valid=U_valid, w_valid=w_valid, generator=generator,
                reg_covar=reg_covar,
            )
        elif self.n_components > len(rows):
            raise ValueError(
                f"n_components={self.n_components} needs at least as many training rows; "
                f"got {len(rows)}. Pass fewer components or n_components='auto'."
            )
        else:
            if self.n_components > max_mixture_size(len(rows), d):
                warnings.warn(
                    f"n_components={self.n_components} leaves fewer than n_features + 1 = "
                    f"{d + 1} training rows per component ({len(rows)} rows): covariances "
                    "this poorly determined are left mostly to their shrinkage towards the "
                    "identity, and fewer components usually score new rows higher. Pass "
                    "fewer components or n_components='auto'.",
                    UserWarning,
                    stacklevel=5,
                )
            fit = fit_gaussian_mixture(
                U, self.n_components, weights=weights, generator=generator, reg_covar=reg_covar
            )
        fit = choose_shrinkage(
            fit, U, weights=weights, x_valid=U_valid, w_valid=w_valid, generator=generator,
            reg_covar=reg_covar,
        )
        more = min(n, _em_refit_rows(d, fit.n_components))
        if more > len(rows):
            # The size was chosen on a subsample; one EM run at that size sees more rows (a
            # 128-D Gaussian from 3,051 of 4,500 rows scored new rows 0.35 nat lower).
            rows = np.arange(n) if more == n else np.sort(
                np.random.RandomState(seed).choice(n, more, replace=False)
            )
            w_more = torch.as_tensor(sample_weight[rows], dtype=torch.float64)
            try:
                fit = refit_gaussian_mixture(
                    fit, mapped(X[rows]), w_more, fit.shrinkage, reg_covar=reg_covar
                )
            except torch.linalg.LinAlgError:  # keep the subsample's fit
                pass
        self._start_shrinkage = fit.shrinkage  # for _refit_base
        return GaussianMixtureBase.from_fit(fit).double()

    def _split(self, n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(n)
        if not self.early_stopping:
            return order, order[:0]
        n_valid = max(1, math.ceil(self.validation_fraction * n))
        if n - n_valid < 2:
            raise ValueError(
                f"early_stopping with validation_fraction={self.validation_fraction} leaves "
                f"{n - n_valid} training sample(s) of n_samples = {n}; need at least 2. "
                "Pass more data or early_stopping=False."
            )
        return order[n_valid:], order[:n_valid]

    def _is_warm(self) -> bool:
        if not (self.warm_start and hasattr(self, "module_")):
            return False
        if getattr(self, "kernel_bandwidth_", None) is not None:
            warnings.warn(
                "warm_start=True, but the fitted flow's base is a kernel estimate on its "
                "training rows, which further training would overfit: fitting afresh.",
                UserWarning, stacklevel=3,
            )
            return False
        return True

    @_fit_context(prefer_skip_nested_validation=True)
    @_undo_input_attrs_on_error
    @_outside_inference_mode
    def fit(self, X, y=None, sample_weight=None):
        """Fit the flow by maximum likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, one row per sample.
        y : None
            Ignored; present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row in the likelihood.

        Returns
        -------
        self : RealNVPDensity
            The fitted estimator.

        Notes
        -----
        The training loop runs with the calling thread's flush-to-zero mode on
        (``torch.set_flush_denormal(True)``) and restores the mode it found: subnormal
        numbers, which long fits produce in weights and optimizer moments, cost the CPU many
        times the time of normal ones. Torch's other threads keep their mode, so every 32
        steps training also sets to zero the weights and Adam's first moments below the
        square root of the smallest normal float (their squares and products would be
        subnormal) and the subnormal second moments.

        On CPU, a fit whose training steps hold fewer than 8,192 activations (rows per step
        times the widest layer) runs on one of torch's threads, and torch's setting is put
        back after it: a second thread gains nothing there, and on a machine with another
        busy process it made small fits several times slower.
        """
        warm = self._is_warm()
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], ensure_min_samples=2, reset=not warm
        )
        sample_weight = _check_positive_weights(check_sample_weight(sample_weight, X))
        _check_training_range(X, self.dtype)
        sizes, mask = self._check_params(X.shape[1])
        device = resolve_device(self.device)
        rng = check_random_state(self.random_state)
        seed = derive_seed(rng)
        train_idx, valid_idx = self._split(len(X), rng)
        threads = self._fit_threads(len(train_idx), X.shape[1], sizes, device)
        with torch_threads_at_most(threads):
            return self._fit_split(
                X, sample_weight, sizes, mask, device, seed, train_idx, valid_idx, warm
            )

    def _fit_threads(self, n_train: int, n_features: int, sizes, device) -> int:
        """Hook: most of torch's threads for the rest of :meth:`fit`: one on CPU where the
        training steps will be small (as :func:`_training_threads`: rows per step times the
        widest of the features and hidden sizes under ``_THREADED_STEP_ELEMENTS``), so the
        mixture's EM and the power transform's choice on such data run on one thread too."""
        if device.type != "cpu":
            return torch.get_num_threads()
        if self.batch_size == "auto":
            batch = self._default_batch_size(n_train)
        else:
            batch = self.batch_size
        return _step_threads(batch, max(n_features, *sizes))

    def _fit_split(
        self, X, sample_weight, sizes, mask, device, seed, train_idx, valid_idx, warm
    ):
        """The part of :meth:`fit` after the data's checks and the validation split."""
        if warm:
            result = self._train(
                self.module_, X, sample_weight, train_idx, valid_idx, device, seed + 1, warm
            )
            self._clip_conditioners(X, sample_weight)
            self._warn_outcome(result)
            return self
        best = None
        specs = self._candidate_specs((sizes, mask), X.shape[1])
        cv_rows = self._cross_validation_rows(sample_weight) if len(valid_idx) else None
        for i, spec in enumerate(specs):
            # Every candidate starts from the same seed: they differ only in their spec. The
            # data warnings of building (constant features) were given by the first build.
            with warnings.catch_warnings():
                if i > 0:
                    warnings.simplefilter("ignore", UserWarning)
                module = self._build_module(
                    X[train_idx], sample_weight[train_idx], *spec, seed,
                    valid=(X[valid_idx], sample_weight[valid_idx]) if len(valid_idx) else None,
                )
            # Out-of-fold gains decide between the best epoch and the start (kept here).
            start = None if cv_rows is None else copy.deepcopy(module)
            result = self._train(
                module, X, sample_weight, train_idx, valid_idx, device, seed + 1, warm,
                min_gain_se=None if cv_rows is None else 0.0,
            )
            if self.verbose and len(specs) > 1:
                print(f"whiten={self.whiten_}: best validation log-likelihood "
                      f"{result.best_score:.4f}")
            if best is None or result.best_score > best[0].best_score:
                best = (result, self._fitted_state(), spec, start)
        result, state, spec, start = best
        vars(self).update(state)
        if start is not None and not result.interrupted:
            self._keep_couplings_if_they_gain_out_of_fold(
                X, sample_weight, cv_rows, valid_idx, spec, start, result, seed, device
            )
        self._refit_base(X, sample_weight, train_idx, valid_idx, result, seed)
        self._clip_conditioners(X, sample_weight)  # the kept candidate only
        self._warn_outcome(result)
        return self

    @property
    def whiten_(self) -> bool:
        """Whether the fitted flow starts with the full-covariance whitening."""
        if "module_" not in vars(self):
            raise AttributeError("'whiten_' is set by fit")
        return any(isinstance(m, TriangularWhitening) for m in self.module_.modules())

    @property
    def power_lambdas_(self) -> np.ndarray | None:
        """Exponents of the fitted flow's Yeo-Johnson transform; None without one."""
        if "module_" not in vars(self):
            raise AttributeError("'power_lambdas_' is set by fit")
        return _fixed_buffer(self.module_, YeoJohnson, "lmbda")

    @property
    def tail_weights_(self) -> np.ndarray | None:
        """Tail weights of the fitted flow's sinh-arcsinh layer; None without one."""
        if "module_" not in vars(self):
            raise AttributeError("'tail_weights_' is set by fit")
        return _fixed_buffer(self.module_, SinhArcsinh, "delta")

    @property
    def n_components_(self) -> int | None:
        """Number of components of the fitted mixture base; None for a standard normal."""
        if "module_" not in vars(self):
            raise AttributeError("'n_components_' is set by fit")
        base = getattr(self.module_, "base", None)
        return None if base is None else base.n_components

    def _fitted_state(self) -> dict:
        """The attributes a fit sets (to restore the better of several candidates)."""
        return {
            k: v for k, v in vars(self).items()
            if (k.endswith("_") and not k.startswith("__"))
            or k in ("_optimizer_state", "_start_shrinkage")
        }

    def _to_tensors(self, X, w, idx, device, dtype, shift=None):
        """Rows ``idx`` of ``X`` (minus ``shift``, in float64) and their weights (None when
        all equal) as tensors."""
        rows = X[idx] if shift is None else X[idx] - shift
        x = torch.as_tensor(rows, device=device).to(dtype)
        weights = w[idx]
        if np.all(weights == weights[0]) if len(weights) else True:
            return x, None
        return x, torch.as_tensor(weights, device=device).to(dtype)

    def _batch_transform(self, generator: torch.Generator, module: torch.nn.Module):
        """Hook: a map applied to each training minibatch (None = data as given): here
        Gaussian noise of ``input_noise`` times each feature's standard deviation."""
        if not self.input_noise:
            return None
        scale = next(m.scale for m in module.modules() if isinstance(m, Standardize))
        std = scale.detach() * self.input_noise

        def draw(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return std * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)

        return fresh_noise_adder(generator, draw)

    def _weight_decay(self, n_train: int) -> float:
        """The weight decay ``alpha`` stands for with ``n_train`` training rows."""
        if self.alpha == "auto":
            return max(_AUTO_ALPHA, 1.0 / max(n_train, 1))
        return float(self.alpha)

    def _resume_optimizer(self, work, alpha: float) -> torch.optim.Optimizer | None:
        state = getattr(self, "_optimizer_state", None)
        if state is None:
            return None
        optimizer = make_adam(work, self.learning_rate_init, alpha)
        decays = [group["weight_decay"] for group in optimizer.param_groups]  # this alpha's
        try:
            optimizer.load_state_dict(state)
        except ValueError:  # saved before the base had its own group: Adam starts afresh
            return None
        for group, decay in zip(optimizer.param_groups, decays, strict=True):
            group["weight_decay"] = decay
        return optimizer

    def _prepare_training_data(self, X, valid_idx, seed: int) -> np.ndarray:
        """Hook: check or map the training array before it becomes tensors (identity here)."""
        return X

    def _default_batch_size(self, n_train: int) -> int:
        """Hook: the minibatch size ``batch_size="auto"`` stands for."""
        return _auto_batch_size(n_train)

    def _epoch_printer(self, n_dims: int):
        """Hook: how ``verbose`` progress lines are shown."""
        return print

    def _train(self, module, X, sample_weight, train_idx, valid_idx, device, seed, warm,
               max_iter=None, schedule=None, keep_better=True, min_gain_se=None):
        """Train ``module`` on rows ``train_idx`` (early stopping on ``valid_idx``) and set
        the fitted attributes; ``min_gain_se`` (default: ``_MIN_GAIN_SE`` if ``keep_better``)
        is what the best epoch must beat the start by (see :func:`~sknvp._training.fit_flow`).
        """
        if min_gain_se is None:
            min_gain_se = _MIN_GAIN_SE if keep_better else 0.0
        X = self._prepare_training_data(X, valid_idx, seed)
        dtype = TORCH_DTYPES[self.dtype]
        # A warm start trains a copy (a failed fit must leave the fitted model as it was); a
        # freshly built module belongs to this fit alone (copying it cost several ms a fit).
        work = copy.deepcopy(module) if warm else module
        # The networks train unclipped; the clipping is measured again afterwards.
        if warm:
            clip_conditioners(work, None)
        # Below float64, the rows are centred in float64 before the cast and the work copy's
        # standardisation centre is moved to 0 (put back after training): casting first
        # would round 1e6 + 1e-3 x to steps of 60 standard deviations, and the centre itself.
        centre = None
        standardize = _leading_standardize(work)
        if dtype != torch.float64 and standardize is not None:
            centre = standardize.loc.detach().to(torch.float64).cpu().clone()
            _zero_centre(work)
        work = work.to(device=device, dtype=dtype)
        shift = None if centre is None else centre.numpy()
        x_tr, w_tr = self._to_tensors(X, sample_weight, train_idx, device, dtype, shift)
        x_va, w_va = self._to_tensors(X, sample_weight, valid_idx, device, dtype, shift)
        alpha = self._weight_decay(len(train_idx))
        optimizer = self._resume_optimizer(work, alpha) if warm else None
        if self.batch_size == "auto":
            batch_size = self._default_batch_size(len(train_idx))
        else:
            batch_size = self.batch_size
        generator = torch.Generator().manual_seed(seed)
        with torch_threads_at_most(_training_threads(work, batch_size, device)):
            result, optimizer = fit_flow(
                work, x_tr, x_valid=x_va if len(valid_idx) else None, w_train=w_tr,
                w_valid=w_va, max_iter=max_iter or self.max_iter, batch_size=batch_size,
                learning_rate_init=self.learning_rate_init,
                learning_rate=schedule or self.learning_rate,
                alpha=alpha, tol=self.tol, n_iter_no_change=self.n_iter_no_change,
                generator=generator, optimizer=optimizer, verbose=self.verbose,
                print_fn=self._epoch_printer(X.shape[1]),
                transform_batch=self._batch_transform(generator, work),
                keep_better=keep_better, min_gain_se=min_gain_se,
            )
        if centre is not None:
            work = work.to(torch.float64)
            standardize.loc.copy_(centre.to(standardize.loc.device))
        self._set_fitted(work, optimizer, result, device, warm)
        return result

    def _cross_validation_rows(self, sample_weight) -> np.ndarray | None:
        """Hook: the rows whose out-of-fold scores decide whether the trained couplings are
        kept over their start (the positive-weight rows, if there are at least
        ``2 * couplings_cv`` and at most ``_CV_MAX_ROWS``), or None to leave it to the
        validation split alone."""
        if self.couplings_cv is None:
            return None
        rows = np.flatnonzero(sample_weight > 0)
        return rows if 2 * self.couplings_cv <= len(rows) <= _CV_MAX_ROWS else None

    def _keep_couplings_if_they_gain_out_of_fold(
        self, X, sample_weight, rows, valid_idx, spec, start, result, seed, device
    ) -> None:
        """Restore ``start`` (the fitted flow before training) unless the same fit, repeated
        without each of ``couplings_cv`` folds of ``rows``, scores the held-out rows at least
        ``_MIN_GAIN_SE`` standard errors above its own start (paired per row). If a fold
        cannot be fitted, or the refits are interrupted, this fit's validation rows
        ``valid_idx`` decide instead. With an ``"auto"`` mixture base, a kernel estimate
        then replaces the base of ``start`` if it beats the flow kept so by as much on the
        same folds (:meth:`_use_kernel_base_if_it_gains`). Where no epoch beat the start,
        the folds only build their starts, for that comparison."""
        trained_any = result.best_epoch >= 0
        if not (trained_any or self._may_use_kernel_base(start)):
            return
        try:
            gains = self._out_of_fold_rows(
                X, sample_weight, rows, spec, seed, device, train=trained_any
            )
        except KeyboardInterrupt:  # as in training: stop, keep what the fit has, and warn
            result.interrupted = True
            gains = None
        if not trained_any:  # the fitted flow is its start already
            if gains is not None:
                *gains, folds = gains
                self._use_kernel_base_if_it_gains(
                    X, sample_weight, folds, start, gains[1], gains[2], result
                )
            return
        where, folds = "out of fold", None
        if gains is None:  # the validation split's rule, as without cross-validation
            gains = self._paired_rows(start, X, valid_idx) + (sample_weight[valid_idx],)
            where = "on the validation rows"
        else:
            *gains, folds = gains
        trained, started, w = gains
        z = gain_in_standard_errors(trained, started, torch.as_tensor(w))
        keep_trained = z >= _MIN_GAIN_SE
        if self.verbose:
            print(f"trained couplings against their start, {where}: {z:+.2f} standard "
                  f"errors; {'trained' if keep_trained else 'start'} kept")
        if folds is not None and self._use_kernel_base_if_it_gains(
            X, sample_weight, folds, start, trained if keep_trained else started, w, result
        ):
            return
        if not keep_trained:
            self._keep_start(start, result)

    def _keep_start(self, start, result) -> None:
        """Make ``start`` (float64, on the fitted device) the fitted flow, as a fit whose
        best epoch did not beat its start."""
        self.module_ = start.to(device=self.device_, dtype=torch.float64).eval()
        result.best_epoch = -1
        result.best_score = result.start_score
        result.start_kept_within_noise = True
        self.best_validation_score_ = result.start_score

    def _may_use_kernel_base(self, start) -> bool:
        """Whether a kernel estimate may replace the mixture base of ``start``."""
        return self.n_components == "auto" and getattr(start, "base", None) is not None

    def _use_kernel_base_if_it_gains(
        self, X, sample_weight, folds, start, kept, w, result
    ) -> bool:
        """With ``n_components="auto"`` and a mixture base: score each fold's rows by the
        kernel estimate (:func:`~sknvp.kernel.fit_kernel`) of the other folds' rows, in the
        coordinates ``start`` (affine) hands its base and with the shapes of the features'
        axes; if that beats ``kept`` (the out-of-fold log-densities of the flow kept so
        far, weights ``w``) by ``_MIN_GAIN_SE`` standard errors, make the fitted flow
        ``start`` with the kernel estimate of every row of the folds as its base, and
        return True."""
        if not self._may_use_kernel_base(start):
            return False
        start = start.to(device=self.device_, dtype=torch.float64).eval()
        rows = np.concatenate(folds)
        x = torch.as_tensor(X[rows], dtype=torch.float64, device=self.device_)
        with torch.no_grad():
            U, log_det = start.transform(x)
        axes = _feature_axes(start, x[:1])
        weights = torch.as_tensor(sample_weight[rows], dtype=torch.float64, device=x.device)
        held, ends = [], np.cumsum([len(f) for f in folds])
        try:
            for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True):
                out = torch.ones(len(rows), dtype=torch.bool, device=x.device)
                out[a:b] = False
                fit = fit_kernel(U[out], weights[out], axes=axes)
                held.append(kernel_log_densities(fit, U[a:b]) + log_det[a:b])
            z = gain_in_standard_errors(torch.cat(held), kept, torch.as_tensor(w))
            if self.verbose:
                print(f"kernel base against the kept flow, out of fold: {z:+.2f} standard "
                      f"errors; {'kernel' if z >= _MIN_GAIN_SE else 'flow'} kept")
            if z < _MIN_GAIN_SE:
                return False
            fit = fit_kernel(U, weights, axes=axes)
        except (ValueError, RuntimeError):  # e.g. a covariance no ridge makes positive
            return False
        start.base = KernelBase.from_fit(fit)
        self._keep_start(start, result)
        self._optimizer_state = None  # the trained fit's moments do not fit this base
        self._kernel_base = True  # not to be refitted by EM
        self.kernel_bandwidth_ = fit.bandwidth
        self.kernel_shape_ = fit.shape
        return True

    def _paired_rows(self, start, X, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-densities of rows ``X[rows]`` under the fitted flow and under ``start``."""
        x = torch.as_tensor(X[rows], dtype=torch.float64, device=self.device_)
        with torch.no_grad():
            start = start.to(device=self.device_, dtype=torch.float64)
            return evaluate_log_prob(self.module_, x), evaluate_log_prob(start, x)

    def _out_of_fold_rows(self, X, sample_weight, rows, spec, seed, device, train=True):
        """``(trained, start, weights)`` for every row of ``rows``: its log-density under a
        fit without its fold (the flow of candidate ``spec``, the mixture base at the fitted
        size, early stopping on a split of the fold's other rows) and under that fit's start,
        then the folds (the rows held out, in that order); None if a fold cannot be
        fitted. Without ``train`` the folds' starts are not trained (``trained`` is
        ``start``)."""
        fold_fit = clone(self).set_params(verbose=0)
        if "power_transform" in fold_fit.get_params():  # the folds keep this fit's choice
            fold_fit.set_params(
                power_transform=None if self.power_lambdas_ is None else "yeo-johnson",
                heavy_tails=self.tail_weights_ is not None,
            )
        fold_fit.n_features_in_ = self.n_features_in_
        if getattr(self.module_, "base", None) is not None and self.n_components == "auto":
            fold_fit.set_params(n_components=self.n_components_)
        folds, rng = self._folds(rows, seed)
        trained, started, order = [], [], []
        for k, held in enumerate(folds):
            fit_rows = np.concatenate(folds[:k] + folds[k + 1:])
            train_rows, valid = fold_fit._split(len(fit_rows), rng)
            train_rows, valid = fit_rows[train_rows], fit_rows[valid]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = fold_fit._build_module(
                        X[train_rows], sample_weight[train_rows], *spec, seed,
                        valid=(X[valid], sample_weight[valid]),
                    )
                    start = copy.deepcopy(module) if train else module
                    if train:
                        fold_fit._train(
                            module, X, sample_weight, train_rows, valid, device, seed + 1,
                            False, min_gain_se=0.0,
                        )
                        fold_fit._clip_conditioners(X[fit_rows], sample_weight[fit_rows])
            except (ValueError, RuntimeError):  # e.g. too few rows, a singular covariance
                return None
            if train:
                pair = fold_fit._paired_rows(start, X, held)
            else:
                x = torch.as_tensor(X[held], dtype=torch.float64, device=self.device_)
                start = start.to(device=self.device_, dtype=torch.float64)
                pair = (evaluate_log_prob(start, x),) * 2
            trained.append(pair[0])
            started.append(pair[1])
            order.append(held)
        held = np.concatenate(order)
        return torch.cat(trained), torch.cat(started), sample_weight[held], order

    def _refit_base(self, X, sample_weight, train_idx, valid_idx, result, seed) -> None:
        """Hook: with ``refit_base``, a mixture base and validation rows, refit the trained
        mixture by EM to the positive-weight rows as the fitted couplings map them (EM on
        the training rows alone must first score the validation rows higher, unless the
        fit kept its EM start)."""
        shrinkage = vars(self).pop("_start_shrinkage", 0.0)
        if vars(self).pop("_kernel_base", False):  # a kernel estimate is not refitted by EM
            return
        base = getattr(self.module_, "base", None)
        if not (self.refit_base and isinstance(base, GaussianMixtureBase) and len(valid_idx)):
            return
        cap = _em_refit_rows(X.shape[1], base.n_components)
        train_idx = np.sort(train_idx[sample_weight[train_idx] > 0])
        if len(train_idx) > cap:
            train_idx = np.sort(np.random.RandomState(seed).choice(train_idx, cap, replace=False))
        valid_idx = np.sort(valid_idx[sample_weight[valid_idx] > 0])
        if len(valid_idx) == 0:
            return
        U_tr, w_tr = self._base_inputs(X, sample_weight, train_idx)
        U_va, w_va = self._base_inputs(X, sample_weight, valid_idx)
        trained = base.as_fit()
        try:
            if result.best_epoch >= 0:  # trained couplings: EM must first earn its place
                polished = refit_gaussian_mixture(trained, U_tr, w_tr, shrinkage)
                if not (
                    mean_log_likelihood(polished, U_va, w_va)
                    > mean_log_likelihood(trained, U_va, w_va)
                ):
                    return
                trained = polished
            final = refit_gaussian_mixture(
                trained, torch.cat([U_tr, U_va]), torch.cat([w_tr, w_va]), shrinkage
            )
        except torch.linalg.LinAlgError:  # a covariance EM made singular: keep the trained one
            return
        if not math.isfinite(final.log_likelihood):
            return
        self.module_.base = GaussianMixtureBase.from_fit(final).to(U_tr)

    def _base_inputs(self, X, sample_weight, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` of ``X`` as the fitted flow hands them to its base, and their
        weights, as float64 tensors on the fitted device."""
        device = self.device_
        with torch.no_grad():
            U = torch.cat([
                self.module_.transform(
                    torch.as_tensor(X[idx[s]], dtype=torch.float64, device=device)
                )[0]
                for s in _row_chunks(len(idx), self._inference_rows(tables=False))
            ])
        w = torch.as_tensor(sample_weight[idx], dtype=torch.float64, device=device)
        return U, w

    def _clip_conditioners(self, X, sample_weight, previous=None) -> None:
        """Hook: with ``clip_conditioner_inputs``, clip each coupling's conditioner input to
        the range the rows of ``X`` with positive weight give it in the fitted flow (widening
        the ranges of ``previous``, the flow before this pass of :meth:`partial_fit`)."""
        if not self.clip_conditioner_inputs:
            return
        if previous is not None:  # start from the ranges of the flow before this pass
            for before, after in zip(
                _coupling_layers(previous), _coupling_layers(self.module_), strict=True
            ):
                after.set_input_range(before.input_low, before.input_high)
        rows = np.flatnonzero(sample_weight > 0)
        batches = (
            torch.as_tensor(X[rows[s]], dtype=torch.float64, device=self.device_)
            for s in _row_chunks(len(rows), self._inference_rows(tables=False))
        )
        clip_conditioners(self.module_, batches, keep_wider=previous is not None)

    @_fit_context(prefer_skip_nested_validation=True)
    @_undo_input_attrs_on_error
    @_outside_inference_mode
    def partial_fit(self, X, y=None, sample_weight=None):
        """Train for one pass over a chunk of data (out-of-core learning).

        The first call builds the flow, with the standardisation statistics of that first
        chunk (kept fixed afterwards: make it representative), and the Adam optimizer; each
        later call continues with the same optimizer state at a constant learning rate
        ``learning_rate_init``. Early stopping and ``max_iter`` do not apply.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A chunk of training data.
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each row.

        Returns
        -------
        self : RealNVPDensity
        """
        first = not hasattr(self, "module_")
        X = validate_data(
            self, X, dtype=[np.float64, np.float32], ensure_min_samples=2, reset=first
        )
        sample_weight = _check_positive_weights(check_sample_weight(sample_weight, X))
        _check_training_range(X, self.dtype)
        sizes, mask = self._check_params(X.shape[1])
        device = resolve_device(self.device)
        # Stored only once the pass succeeded: a failing call leaves the model as it was.
        partial_seed = getattr(self, "_partial_seed", None)
        if first or partial_seed is None:
            partial_seed = derive_seed(check_random_state(self.random_state))
        seed = partial_seed + 2 * getattr(self, "n_iter_", 0)
        idx = np.arange(len(X))
        if first:
            spec = self._candidate_specs((sizes, mask), X.shape[1])[0]  # no validation rows
            module = self._build_module(X, sample_weight, *spec, seed)
            vars(self).pop("_start_shrinkage", None)  # no validation rows to refit with
        else:
            module = self.module_
        result = self._train(
            module, X, sample_weight, idx, idx[:0], device, seed + 1, not first,
            max_iter=1, schedule="constant", keep_better=False,
        )
        self._clip_conditioners(X, sample_weight, previous=None if first else module)
        self._partial_seed = partial_seed
        if result.diverged:
            self._warn_outcome(result)
        return self

    def _set_fitted(self, work, optimizer, result, device, warm) -> None:
        self.module_ = work.to(torch.float64).eval()
        self.kernel_bandwidth_ = self.kernel_shape_ = None
        self._optimizer_state = optimizer.state_dict()
        self.device_ = device
        previous = self.n_iter_ if warm else 0
        self.n_iter_ = previous + result.n_iter
        self.loss_curve_ = (self.loss_curve_ if warm else []) + result.loss_curve
        self.validation_scores_ = (
            self.validation_scores_ if warm else []
        ) + result.validation_scores
        self.best_validation_score_ = (
            result.best_score if result.validation_scores else None
        )
        self.converged_ = result.converged
        self.lr_drops_ = list(result.lr_drops)

    def _warn_outcome(self, result) -> None:
        if result.diverged:
            where = f"epoch {result.n_iter + 1}"
            kept = (
                f"the weights of epoch {result.best_epoch + 1}"
                if result.best_epoch >= 0 else "the initial weights"
            )
            warnings.warn(
                f"Training produced a non-finite loss or weights at {where}; kept {kept}. "
                "Lower learning_rate_init, lower scale_bound, or check the data for "
                "duplicated points, constant or collinear features.",
                ConvergenceWarning,
                stacklevel=4,
            )
        elif result.interrupted:
            warnings.warn(
                f"Training interrupted after {result.n_iter} epoch(s); the best weights so "
                "far were kept.",
                UserWarning,
                stacklevel=4,
            )
        elif _unstable(result):
            curve = _since_last_drop(result)[0]  # not empty: _unstable needs epochs there
            kept = (
                f"the weights of epoch {result.best_epoch + 1}"
                if result.best_epoch >= 0 else "the initial weights"
            )
            warnings.warn(
                f"Training was unstable: the training loss ended at {curve[-1]:.3g}"
                f" nats per sample (best {min(curve):.3g}); kept {kept}."
                f" Lower learning_rate_init (now {self.learning_rate_init:g}) or scale_bound.",
                ConvergenceWarning,
                stacklevel=4,
            )
        elif _fell_from_start(result):
            curve, valid = _since_last_drop(result)
            warnings.warn(
                "No epoch beat the initial weights on the validation rows: their mean "
                f"log-likelihood fell from {result.best_score:.4g} to {min(valid):.4g} while "
                f"the training loss fell to {min(curve):.4g} nats per sample. The flow "
                "overfits the training rows from the first epoch, so the initial weights "
                "(the flow's untrained starting point) were kept. More rows, input_noise, "
                "alpha or a smaller network may fit better.",
                ConvergenceWarning,
                stacklevel=4,
            )
        elif not result.converged:
            warnings.warn(
                f"max_iter={self.max_iter} reached before the "
                f"{'validation score' if self.early_stopping else 'training loss'} stopped "
                "improving. Consider increasing max_iter.",
                ConvergenceWarning,
                stacklevel=4,
            )

    # ---------------------------------------------------------------- inference

    def _inference_rows(self, tables: bool = True) -> int:
        """Rows per inference chunk: cache-sized activations on CPU, large chunks elsewhere
        (``tables``: the conditioners that inference evaluates as tables hold none)."""
        if self.device_.type != "cpu":
            return _INFERENCE_ROWS
        base = getattr(self.module_, "base", None)
        own = set() if base is None else {id(p) for p in base.parameters()}
        if tables:
            own |= {
                id(p) for m in self.module_.modules()
                if isinstance(m, MLP) and is_piecewise_linear(m) for p in m.parameters()
            }
        widths = [
            p.shape[0] for p in self.module_.parameters() if p.ndim >= 2 and id(p) not in own
        ]
        width = max([self.n_features_in_, *widths])
        itemsize = self._inference_dtype().itemsize
        rows = _CPU_CHUNK_BYTES // (width * itemsize)
        if base is not None:  # the base's residuals: one row of features per component
            per_row = base.n_components * base.n_features * itemsize
            rows = min(rows, _CPU_BASE_CHUNK_BYTES // per_row)
        return min(_INFERENCE_ROWS, max(256, rows))

    def _inference_dtype(self) -> torch.dtype:
        """Hook: the dtype inference runs in (``inference_dtype``)."""
        return TORCH_DTYPES[self.inference_dtype]

    def _inference_centre(self) -> np.ndarray | None:
        """The standardisation's centre (float64) that rows lose before the cast to an
        inference dtype below float64 (as in training; None in float64)."""
        standardize = _leading_standardize(self.module_)
        if self._inference_dtype() == torch.float64 or standardize is None:
            return None
        return standardize.loc.detach().to("cpu", torch.float64).numpy()

    def _inference_module(self):
        """The fitted flow in the inference dtype (``module_`` itself or a cached copy; below
        float64 a copy centred at 0, for rows minus :meth:`_inference_centre`)."""
        centred = self._inference_centre() is not None
        module = cast_module(
            self.module_, self._inference_dtype(), _zero_centre if centred else None
        )
        return use_tables(module)  # one-input conditioners as tables (sknvp.piecewise)

    def _map(self, fn, X, out_shape, *, shift_in=None, shift_out=None) -> np.ndarray:
        return map_batches(
            fn, X, out_shape, device=self.device_, dtype=self._inference_dtype(),
            batch_rows=self._inference_rows(), shift_in=shift_in, shift_out=shift_out,
        )

    def _validated(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=[np.float64, np.float32], reset=False)

    def score_samples(self, X):
        """Log-density of each row of ``X``, in the units of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Points to evaluate.

        Returns
        -------
        log_density : ndarray of shape (n_samples,)
            Natural log of the density at each row. Rows so far from the data that the
            density underflows get the lowest finite float64 rather than ``-inf``.
        """
        X = self._validated(X)
        module = self._inference_module()
        lowest = -np.finfo(np.float64).max  # per chunk: no temporaries the size of X

        def log_prob(x):
            log_p = module.log_prob(x).to(torch.float64)
            return torch.nan_to_num(log_p, nan=lowest, neginf=lowest)

        return self._map(log_prob, X, (), shift_in=self._inference_centre())

    def score(self, X, y=None):
        """Mean log-likelihood per sample of ``X`` (as GaussianMixture; higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Points to evaluate.
        y : None
            Ignored.

        Returns
        -------
        score : float
            ``score_samples(X).mean()``.
        """
        return float(np.mean(self.score_samples(X)))

    def transform(self, X):
        """Map rows of ``X`` to the flow's standard-normal latent space.

        With a mixture base the map ends with the mixture's Rosenblatt transform, so the
        latent codes of data drawn from the fitted density are standard normal either way.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray of shape (n_samples, n_features)
        """
        X = self._validated(X)
        module = self._inference_module()
        return self._map(
            lambda x: module(x)[0], X, (self.n_features_in_,), shift_in=self._inference_centre()
        )

    def inverse_transform(self, Z):
        """Map latent points back to data space (the inverse of :meth:`transform`).

        With a mixture base the mixture's Rosenblatt transform is inverted numerically, one
        feature at a time (Newton's method inside a bracket): exact to rounding wherever the
        fitted density is not negligible, but slower than :meth:`transform` (use
        :meth:`sample` to draw).

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_features)

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        # Latent columns are not the data's features: no feature-name check (as sklearn's
        # inverse_transform methods), so the output of transform under
        # set_output(transform="pandas") comes back; the column count is still checked.
        Z = check_array(Z, dtype=[np.float64, np.float32], input_name="X", estimator=self)
        check_n_features(self, Z)
        module = self._inference_module()
        return self._map(
            lambda z: module.inverse(z)[0], Z, (self.n_features_in_,),
            shift_out=self._inference_centre(),
        )

    def sample(self, n_samples=1, random_state=None, temperature=1.0):
        """Draw samples from the fitted density.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples (0 gives an empty array).
        random_state : int, RandomState instance or None, default=None
            Seed for this draw; ``None`` uses numpy's global random state. On CPU a longer
            draw with the same seed begins with the rows of a shorter one, and the inference
            dtype changes the samples only by its rounding.
        temperature : float, default=1.0
            Standard deviation of the latent normal (with a mixture base: the factor on each
            component's spread); below 1 gives more typical samples.
            Must be positive and finite; one so large that samples overflow the inference
            dtype raises ``ValueError`` rather than returning non-finite values.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        n_samples = _check_n_samples(n_samples)
        temperature = _check_temperature(temperature)
        seed = derive_seed(check_random_state(random_state))
        z = np.empty((n_samples, self.n_features_in_))
        # The latent draw is float64 whatever the inference dtype, so a seed gives the same
        # samples (to float32 precision) in either. On CPU it is numpy's ziggurat, drawn into
        # the output array (twice as fast as torch's float64 normal, and no extra memory).
        on_cpu = self.device_.type == "cpu"
        if on_cpu:
            np.random.default_rng(seed).standard_normal(out=z)
        else:
            gen = torch.Generator(device=self.device_).manual_seed(seed)
        rows = self._inference_rows()
        module = self._inference_module()
        centre = self._inference_centre()
        pick = self._component_picker(module, seed)
        with torch.inference_mode():
            for start in range(0, n_samples, rows):
                stop = min(start + rows, n_samples)
                noise = torch.from_numpy(z[start:stop]) if on_cpu else torch.randn(
                    (stop - start, self.n_features_in_), generator=gen, device=self.device_,
                    dtype=torch.float64,
                )
                noise = (noise * temperature).to(self._inference_dtype())
                if pick is None:
                    x = module.inverse(noise)[0]
                else:  # a draw from the mixture, then back through the couplings
                    picked = torch.as_tensor(pick(stop - start), device=noise.device)
                    x = module.transform.inverse(module.base.draw(picked, noise))[0]
                z[start:stop] = x.cpu().numpy()
                if centre is not None:
                    z[start:stop] += centre
                if not np.isfinite(z[start:stop]).all():
                    raise ValueError(
                        f"temperature={temperature!r} is too large: samples overflow "
                        f"{str(self._inference_dtype()).removeprefix('torch.')}."
                    )
        return z

    @staticmethod
    def _component_picker(module, seed: int):
        """``pick(n)``: the mixture components of the next ``n`` samples (None for a standard
        normal base). A stream of its own, drawn chunk by chunk, so that a longer draw with
        the same seed begins with a shorter one."""
        base = getattr(module, "base", None)
        if base is None:
            return None
        edges = np.cumsum(torch.softmax(base.logits.detach().double(), 0).cpu().numpy())
        stream = np.random.default_rng([seed, 1])
        last = len(edges) - 1

        def pick(n: int) -> np.ndarray:
            picked = np.searchsorted(edges, stream.random(n) * edges[-1], side="right")
            return np.minimum(picked, last, out=picked)

        return pick

    # -------------------------------------------------------------- persistence

    def __getstate__(self):
        state = dict(super().__getstate__())  # object.__getstate__ returns the live __dict__
        if "module_" in state and self.device_.type != "cpu":
            state["module_"] = copy.deepcopy(self.module_).cpu()
            state["_optimizer_state"] = _state_to_cpu(state.get("_optimizer_state"))
        if "device_" in state:
            state["device_"] = str(self.device_)
        return state

    def __setstate__(self, state):
        device = state.get("device_")
        if device is not None:
            dev = torch.device(device)
            try:
                dev = resolve_device(dev)
            except ValueError:
                dev = torch.device("cpu")
            state["device_"] = dev
            state["module_"] = state["module_"].to(dev)
        fitted = "module_" in state
        if fitted:
            # Fitted before plateaus could lower the learning rate (none did), or before the
            # kernel base (none has one).
            state.setdefault("lr_drops_", [])
            state.setdefault("kernel_bandwidth_", None)
            state.setdefault("kernel_shape_", None)
        # A parameter the pickle lacks is younger than it. A fitted model keeps the fit it
        # had, and says so (a refit keeps it that way): the option's "off" value for those
        # that change a fit; any other parameter, and all of an unfitted model's, take
        # today's default, so that get_params (repr, clone) works.
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or param.default is inspect.Parameter.empty:
                continue
            off = fitted and name in _OFF_WHEN_FITTED
            state.setdefault(name, _OFF_WHEN_FITTED[name] if off else param.default)
        super().__setstate__(state)

    @property
    def _n_features_out(self) -> int:
        return self.n_features_in_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


def _check_positive_weights(sample_weight: np.ndarray) -> np.ndarray:
    if not sample_weight.sum() > 0:
        raise ValueError("sample_weight must have a positive sum, got all zeros.")
    return sample_weight


def _training_threads(module: torch.nn.Module, batch_size: int, device: torch.device) -> int:
    """Most of torch's threads a training loop uses: one on CPU where a step's activations
    (``batch_size`` rows times the widest linear layer of ``module``, a flow without
    convolutions) are fewer than ``_THREADED_STEP_ELEMENTS``, otherwise torch's own setting."""
    layers = list(module.modules())
    linear = [m for m in layers if isinstance(m, torch.nn.Linear)]
    convolutions = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in layers)
    if device.type != "cpu" or convolutions or not linear:  # images: activations per pixel
        return torch.get_num_threads()
    return _step_threads(batch_size, max(max(m.in_features, m.out_features) for m in linear))


def _step_threads(rows: int, widest: int) -> int:
    """One thread for training steps of ``rows`` by ``widest`` under
    ``_THREADED_STEP_ELEMENTS`` activations, else torch's own setting."""
    return 1 if rows * widest < _THREADED_STEP_ELEMENTS else torch.get_num_threads()


def _auto_batch_size(n_train: int) -> int:
    """At least ~16 steps per epoch on small data, at most 512 rows per step.

    512 rather than 256 on large data: an epoch costs about half as much (a step's time is
    mostly per-operation overhead at these sizes), and held-out log-likelihood on the
    10,000-row 2-D benchmark sets was as good or better (docs/benchmarks.md, ablation).
    """
    return int(min(512, max(16, n_train // 16), n_train))


def _check_n_samples(n_samples) -> int:
    if isinstance(n_samples, (bool, np.bool_)) or not isinstance(n_samples, Integral):
        raise TypeError(f"n_samples must be an int, got {type(n_samples).__name__}.")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}.")
    return int(n_samples)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}.")
    if not 0 < temperature < np.inf:
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}.")
    return float(temperature)


def _unstable(result) -> bool:
    """Training blew up without non-finite values: the training loss ended more than 1 nat
    above its best, or no epoch beat the initial weights, validation fell over 1 nat and the
    training loss never got below the initial weights' loss (the steps themselves made the
    model worse; when the training loss did fall, that is overfitting, not instability), or,
    without validation rows, no epoch's training loss came within 1 nat of the initial
    weights' and they were kept.

    Only the epochs after the last learning-rate drop count: a drop restores the best weights,
    so the curves restart from there (a loss that overfitting had pushed down jumps back up),
    and what came before the drop has already been undone.
    """
    curve, _ = _since_last_drop(result)
    rose = bool(curve) and curve[-1] > min(curve) + 1.0
    # With no better epoch, best_score is the initial weights' validation score, and their
    # loss on the training rows is about its negative.
    never = _fell_from_start(result) and min(curve) > -result.best_score - 1.0
    # Without validation rows best_score is the initial weights' own training log-likelihood.
    never_without_validation = (
        not result.validation_scores and result.best_epoch < 0 and bool(curve)
        and min(curve) > -result.best_score + 1.0
    )
    return rose or never or never_without_validation


def _fell_from_start(result) -> bool:
    """No epoch beat the initial weights, and the validation score fell over 1 nat below
    theirs (epochs after the last learning-rate drop, as in :func:`_unstable`)."""
    valid = _since_last_drop(result)[1]
    return (
        result.best_epoch < 0 and not result.start_kept_within_noise and bool(valid)
        and min(valid) < result.best_score - 1.0
    )


def _since_last_drop(result) -> tuple[list, list]:
    """The training losses and validation scores of the epochs after the last drop."""
    start = result.lr_drops[-1] + 1 if result.lr_drops else 0
    return result.loss_curve[start:], result.validation_scores[start:]


def _state_to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _state_to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_state_to_cpu(v) for v in state]
    return state
