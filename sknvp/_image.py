r"""`RealNVPImageDensity`: the Real-NVP paper's multi-scale image model as an estimator."""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._compat import Interval, StrOptions
from ._density import (
    _GLOBAL_RNG_LOCK,
    _INPUT_ATTRS,
    RealNVPDensity,
    _check_n_samples,
    _check_temperature,
    _undo_input_attrs_on_error,
)
from ._training import fresh_noise_adder
from ._utils import TORCH_DTYPES, derive_seed
from .multiscale import auto_n_scales, build_multiscale, check_n_scales

__all__ = ["RealNVPImageDensity", "dequantized_bits_per_dim"]

# Pixel values per inference chunk (rows = this // n_features): bounds activation memory.
_INFERENCE_VALUES = 2**18
_LOG2 = math.log(2.0)
_EPOCH_LINE = re.compile(r"Epoch (\d+), loss = (\S+?)(?:, validation score = (\S+))?$")


def dequantized_bits_per_dim(score_samples, X, *, n_draws=1, random_state=None) -> float:
    r"""Bits per dimension of integer pixel data under a continuous density.

    .. math::
        \text{bits/dim} = -\frac{1}{D \ln 2}\,
        \mathbb E_{x}\,\mathbb E_{u \sim U[0,1)^D} \left[\log p(x + u)\right]

    with ``score_samples`` the log-density in units of one pixel level. It is an upper bound
    on the discrete model's bits/dim, :math:`-\log_2 P(x) / D` with :math:`P(x) =
    \int_{[0,1)^D} p(x + u)\,du` (Jensen), the figure the Real-NVP paper reports. A density
    on ``x / 256`` instead of ``x`` is converted by adding :math:`D \ln 256` to its negative
    log-likelihood, which gives the same number. Use the same function for every model
    compared.

    Parameters
    ----------
    score_samples : callable
        Maps an array ``(n_samples, D)`` of continuous pixel values to log-densities
        ``(n_samples,)`` (e.g. a fitted estimator's ``score_samples``).
    X : array-like of shape (n_samples, D) or (n_samples, ...)
        Integer pixel levels; trailing dimensions are flattened.
    n_draws : int, default=1
        Dequantisation noise draws averaged per sample (more gives a less noisy estimate).
    random_state : int, RandomState instance or None, default=None
        Seed of the noise.

    Returns
    -------
    bits_per_dim : float

    Examples
    --------
    A uniform density on :math:`[0, 16)^D` has exactly 4 bits/dim:

    >>> import numpy as np
    >>> X = np.zeros((3, 5))
    >>> dequantized_bits_per_dim(lambda Z: np.full(len(Z), -5 * np.log(16)), X)
    4.0
    """
    X = np.asarray(X, dtype=np.float64)
    X = X.reshape(len(X), -1)
    if not (isinstance(n_draws, Integral) and n_draws >= 1):
        raise ValueError(f"n_draws must be a positive int, got {n_draws!r}.")
    rng = check_random_state(random_state)
    total = 0.0
    for _ in range(n_draws):
        total += float(np.mean(score_samples(X + rng.uniform(size=X.shape))))
    return -total / n_draws / (X.shape[1] * _LOG2)


class RealNVPImageDensity(RealNVPDensity):
    r"""Density estimation for images with the Real-NVP paper's multi-scale flow.

    Per scale the flow applies 3 affine couplings with alternating checkerboard masks, a
    squeeze (2x2 pixels to 4 channels), 3 couplings with alternating channel masks, and sends
    half of the channels to the Gaussian latent; the last scale has 4 checkerboard couplings
    (Dinh et al., 2016). The couplings' scale and shift come from convolutional residual
    networks with batch normalisation; batch-normalisation layers with their log-determinant
    sit between the couplings. Pixel levels are dequantised with uniform noise during training
    and go through the paper's logit transform, whose log-determinant is part of every
    log-density, so :meth:`score_samples` is the log-density of ``X`` itself (continuous pixel
    values, in units of one level). :meth:`bits_per_dim` reports the standard figure.

    Parameters
    ----------
    image_shape : tuple (channels, height, width) or None, default=None
        Shape of one image. ``None`` takes it from 3-D ``(n, height, width)`` or 4-D ``(n,
        channels, height, width)`` input, or treats rows of a square number of pixels as
        one-channel square images (64 -> (1, 8, 8)).
    n_levels : int, default=256
        Number of pixel levels: values are in ``[0, n_levels - 1]`` (256 for 8-bit images, 17
        for :func:`~sklearn.datasets.load_digits`).
    dequantize : bool, default=True
        Add fresh uniform noise on ``[0, 1)`` to every training batch (and fixed noise to the
        validation rows). Turn off for data that are already continuous in ``[0, n_levels]``.
    logit_alpha : float, default=0.05
        The logit transform's :math:`\alpha`: pixels are mapped to
        :math:`\mathrm{logit}(\alpha + (1 - 2\alpha) x / L)`.
    n_scales : int or "auto", default="auto"
        Number of scales (``n_scales - 1`` squeezes). ``"auto"`` squeezes while the next
        scale is at least 4x4, as in the paper (8x8 -> 2 scales, 32x32 -> 4).
    n_blocks : int, default=4
        Residual blocks in each conditioner network.
    n_channels : int, default=32
        Feature maps of the conditioners at the first scale; doubled at each coarser scale.
    activation : {"relu", "leaky_relu", "tanh", "elu", "gelu", "silu"}, default="relu"
        Conditioner activation.
    batch_norm : bool, default=True
        Batch-normalisation flow layers after every coupling (batch statistics in training,
        running averages afterwards).
    scale_bound : float, default=2.0
        Soft bound on each coupling's log-scale.
    max_iter : int, default=100
        Maximum number of epochs.
    batch_size : int or "auto", default="auto"
        Images per step; ``"auto"`` is ``min(64, n_samples)``, the paper's batch size.
    learning_rate_init, learning_rate, alpha, early_stopping, validation_fraction
        As in :class:`~sknvp.RealNVPDensity` (``alpha`` is the L2 penalty; the logit's
        constant is ``logit_alpha``).
    n_iter_no_change, tol, warm_start, random_state, device, dtype
        As in :class:`~sknvp.RealNVPDensity`; ``tol`` is in nats per image.
    verbose : int, default=0
        When positive, print per epoch the training loss and the validation bits/dim.

    Attributes
    ----------
    module_ : sknvp.multiscale.MultiScaleRealNVPFlow
        The fitted flow: float64 on the CPU, ``dtype`` on an accelerator.
    image_shape_ : tuple of int
        ``(channels, height, width)`` used.
    n_scales_ : int
        Number of scales used.
    device_ : torch.device
        Where the model lives.
    n_features_in_ : int
        Pixels per image (channels * height * width).
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Column names, when ``X`` was a DataFrame.
    n_iter_ : int
        Epochs run.
    loss_curve_ : list of float
        Training loss per epoch, in nats per image (:meth:`bits_per_dim` converts).
    validation_scores_ : list of float
        Validation log-likelihood per epoch, nats per image (empty without early stopping).
    best_validation_score_ : float or None
        Best of ``validation_scores_``.
    converged_ : bool
        Whether training stopped because the monitored score stopped improving.
    lr_drops_ : list of int
        Epochs of the last :meth:`fit` at which a plateau divided the learning rate by 10
        (see ``n_iter_no_change`` in :class:`~sknvp.RealNVPDensity`).

    See Also
    --------
    sknvp.RealNVPDensity : The vector model.
    dequantized_bits_per_dim : The conversion used by :meth:`bits_per_dim`.

    Notes
    -----
    Inputs may be rows of flattened pixels (the scikit-learn convention, e.g.
    ``load_digits().data``) or image arrays; :meth:`sample`, :meth:`transform` and
    :meth:`inverse_transform` return arrays shaped like the data given to :meth:`fit`.
    Samples are continuous; ``np.floor`` maps them to integer levels.

    References
    ----------
    .. [1] L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation using Real NVP",
       ICLR 2017, https://arxiv.org/abs/1605.08803

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sknvp import RealNVPImageDensity
    >>> X = load_digits().data[:100]
    >>> est = RealNVPImageDensity(n_levels=17, n_blocks=1, n_channels=4, max_iter=1,
    ...                           early_stopping=False, random_state=0).fit(X)
    >>> est.image_shape_, est.sample(2, random_state=0).shape
    ((1, 8, 8), (2, 64))
    """

    # A failing fit also restores the remembered input layout.
    _input_attrs: ClassVar[tuple] = (*_INPUT_ATTRS, "_fit_layout")

    _parameter_constraints: ClassVar[dict] = {
        **{
            k: v
            for k, v in RealNVPDensity._parameter_constraints.items()
            if k not in (
                "n_couplings", "hidden_layer_sizes", "mask", "whiten", "inference_dtype",
                "input_noise",  # images get dequantisation noise instead
                "clip_conditioner_inputs",  # vector flows only
                "base", "n_components", "refit_base",  # the multi-scale flow: standard normal
                "couplings_cv",  # the validation split decides (_cross_validation_rows)
                "power_transform", "heavy_tails",  # pixels: dequantised levels
            )
        },
        "image_shape": [None, tuple, list],
        "n_levels": [Interval(Integral, 2, None, closed="left")],
        "dequantize": ["boolean"],
        "logit_alpha": [Interval(Real, 0, 0.5, closed="left")],
        "n_scales": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_blocks": [Interval(Integral, 0, None, closed="left")],
        "n_channels": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        *,
        image_shape=None,
        n_levels=256,
        dequantize=True,
        logit_alpha=0.05,
        n_scales="auto",
        n_blocks=4,
        n_channels=32,
        activation="relu",
        batch_norm=True,
        scale_bound=2.0,
        max_iter=100,
        batch_size="auto",
        learning_rate_init=1e-3,
        learning_rate="cosine",
        alpha=0.0,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        tol=1e-4,
        warm_start=False,
        verbose=0,
        random_state=None,
        device="auto",
        dtype="float32",
    ):
        self.image_shape = image_shape
        self.n_levels = n_levels
        self.dequantize = dequantize
        self.logit_alpha = logit_alpha
        self.n_scales = n_scales
        self.n_blocks = n_blocks
        self.n_channels = n_channels
        self.activation = activation
        self.batch_norm = batch_norm
        self.scale_bound = scale_bound
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.verbose = verbose
        self.random_state = random_state
        self.device = device
        self.dtype = dtype

    # ------------------------------------------------------------ input shapes

    def _as_rows(self, X, reset: bool):
        """Flatten 3-D/4-D image arrays to rows; remember the layout at fit."""
        ndim = getattr(X, "ndim", None) or np.ndim(X)
        if ndim not in (3, 4):
            if reset:
                self._fit_layout = None
            return X
        X = np.asarray(X)
        shape = (1, *X.shape[1:]) if ndim == 3 else tuple(X.shape[1:])
        expected = self.image_shape if reset else self.image_shape_
        if expected is not None and tuple(expected) != shape:
            raise ValueError(
                f"Expected images of shape (channels, height, width) = {tuple(expected)}, "
                f"got {shape} (input array of shape {X.shape})."
            )
        if reset:
            self._fit_layout = X.shape[1:]
        return X.reshape(len(X), -1)

    def _to_fit_layout(self, rows: np.ndarray) -> np.ndarray:
        layout = getattr(self, "_fit_layout", None)
        return rows if layout is None else rows.reshape(len(rows), *layout)

    def _resolve_shape(self, n_features: int) -> tuple[int, int, int]:
        layout = getattr(self, "_fit_layout", None)
        if self.image_shape is not None:
            shape = tuple(int(s) for s in self.image_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(
                    f"Expected image_shape (channels, height, width), got {self.image_shape}."
                )
        elif layout is not None:
            shape = (1, *layout) if len(layout) == 2 else tuple(layout)
        else:
            side = math.isqrt(n_features)
            if side * side != n_features:
                raise ValueError(
                    f"image_shape=None needs square one-channel images, got n_features = "
                    f"{n_features}, not a square. Pass image_shape=(channels, height, width)."
                )
            shape = (1, side, side)
        if math.prod(shape) != n_features:
            raise ValueError(
                f"Expected n_features = channels * height * width = {math.prod(shape)} for "
                f"image_shape={shape}, got n_features = {n_features}."
            )
        return shape

    # ------------------------------------------------------------------ fitting

    @_undo_input_attrs_on_error
    def fit(self, X, y=None, sample_weight=None):
        """Fit the flow by maximum likelihood on dequantised pixel levels.

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W), (n_samples, H, W) or (n_samples, C, H, W)
            Pixel levels in ``[0, n_levels - 1]`` (``[0, n_levels]`` without dequantisation).
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weight of each image in the likelihood.

        Returns
        -------
        self : RealNVPImageDensity
        """
        self._validate_params()
        warm = self._is_warm()
        return super().fit(self._as_rows(X, reset=not warm), y, sample_weight)

    @_undo_input_attrs_on_error
    def partial_fit(self, X, y=None, sample_weight=None):
        """One pass over a chunk of images (see :meth:`RealNVPDensity.partial_fit`).

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W), (n_samples, H, W) or (n_samples, C, H, W)
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : RealNVPImageDensity
        """
        self._validate_params()
        return super().partial_fit(
            self._as_rows(X, reset=not hasattr(self, "module_")), y, sample_weight
        )

    def _check_params(self, n_features: int) -> tuple:
        shape = self._resolve_shape(n_features)
        if self.n_scales == "auto":
            n_scales = auto_n_scales(shape)
        else:
            n_scales = check_n_scales(shape, self.n_scales)
        self._spec = (shape, n_scales)
        return shape, n_scales

    def _candidate_specs(self, spec: tuple, n_features: int) -> list[tuple]:
        return [spec]  # one architecture: nothing to choose on the validation split

    def _build_module(self, X, sample_weight, shape, n_scales, seed: int, valid=None):
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_multiscale(
                shape,
                n_scales=n_scales,
                n_blocks=self.n_blocks,
                n_channels=self.n_channels,
                activation=self.activation,
                batch_norm=self.batch_norm,
                scale_bound=self.scale_bound,
                n_levels=self.n_levels,
                alpha=self.logit_alpha,
            ).double()

    def _check_range(self, X: np.ndarray) -> None:
        high = self.n_levels - 1 if self.dequantize else self.n_levels
        low_seen, high_seen = float(np.min(X)), float(np.max(X))
        if low_seen < 0 or high_seen > high:
            raise ValueError(
                f"Expected pixel levels in [0, {high}] (n_levels={self.n_levels}, "
                f"dequantize={self.dequantize}), got values in [{low_seen:g}, {high_seen:g}]. "
                "Pass images in level units, e.g. 0..255 for 8-bit images."
            )

    def _batch_transform(self, generator: torch.Generator, module):
        """Fresh uniform dequantisation noise for each training batch (None when off)."""
        if not self.dequantize:
            return None
        return fresh_noise_adder(
            generator,
            lambda x, gen: torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype),
        )

    def _dequantize_validation(self, X, valid_idx, seed: int) -> np.ndarray:
        if not (self.dequantize and len(valid_idx)):
            return X
        X = np.array(X, dtype=np.float64)
        noise = np.random.RandomState(seed % 2**32).uniform(size=(len(valid_idx), X.shape[1]))
        X[valid_idx] += noise
        return X

    def _epoch_printer(self, n_dims: int):
        per_bit = 1.0 / (n_dims * _LOG2)

        def show(message: str) -> None:
            match = _EPOCH_LINE.match(message)
            if match is None:
                print(message)
                return
            epoch, loss, score = match.groups()
            line = f"Epoch {epoch}: train {float(loss) * per_bit:.4f} bits/dim"
            if score is not None:
                line += f", validation {-float(score) * per_bit:.4f} bits/dim"
            print(line)

        return show

    def _cross_validation_rows(self, sample_weight) -> np.ndarray | None:
        """Images are left to the validation split: each of the out-of-fold check's
        refits would be a full multi-scale fit (and its dequantisation noise would need its
        own stream); :class:`RealNVPDensity` cross-validates up to 1,000 rows."""
        return None

    def _prepare_training_data(self, X, valid_idx, seed: int) -> np.ndarray:
        self._check_range(X)
        return self._dequantize_validation(X, valid_idx, seed)

    def _default_batch_size(self, n_train: int) -> int:
        return min(64, n_train)

    def _fit_threads(self, n_train: int, n_features: int, sizes, device) -> int:
        # Convolutions: activations per pixel and channel, large steps on few rows.
        return torch.get_num_threads()

    def _inference_dtype(self) -> torch.dtype:
        return torch.float64 if self.device_.type == "cpu" else TORCH_DTYPES[self.dtype]

    def _clip_conditioners(self, X, sample_weight, previous=None) -> None:
        """The multi-scale flow's convolutional couplings are not clipped."""

    def _refit_base(self, X, sample_weight, train_idx, valid_idx, result, seed) -> None:
        """The multi-scale flow's base is a standard normal: nothing to refit."""

    def _set_fitted(self, work, optimizer, result, device, warm) -> None:
        super()._set_fitted(work, optimizer, result, device, warm)
        self.module_ = self.module_.to(self._inference_dtype())
        self.image_shape_, self.n_scales_ = self._spec

    def __getstate__(self):
        # The base class edits the state dict it gets from object.__getstate__, which in
        # Python >= 3.11 is the live __dict__: keep our own attributes intact while pickling.
        saved = self.__dict__.copy()
        state = dict(super().__getstate__())
        self.__dict__.clear()
        self.__dict__.update(saved)
        return state

    # ---------------------------------------------------------------- inference

    def _inference_rows(self, tables: bool = True) -> int:
        return max(1, _INFERENCE_VALUES // self.n_features_in_)

    def _validated(self, X) -> np.ndarray:
        check_is_fitted(self)
        return super()._validated(self._as_rows(X, reset=False))

    def score_samples(self, X):
        """Log-density of each image, in units of one pixel level per dimension.

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W), (n_samples, H, W) or (n_samples, C, H, W)
            Continuous pixel values (e.g. dequantised levels).

        Returns
        -------
        log_density : ndarray of shape (n_samples,)
            Natural log of the density; outside the logit transform's domain (pixels well
            outside ``[0, n_levels]``) the lowest finite float64.
        """
        return super().score_samples(X)

    def bits_per_dim(self, X, n_draws=1, random_state=None) -> float:
        """Bits per dimension of integer pixel levels (the figure the paper reports).

        With ``dequantize=True`` this is :func:`dequantized_bits_per_dim` of
        :meth:`score_samples` (uniform noise added to ``X``); otherwise ``X`` is taken as
        continuous and the figure is ``-score(X) / (D ln 2)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W), (n_samples, H, W) or (n_samples, C, H, W)
            Integer pixel levels in ``[0, n_levels - 1]``.
        n_draws : int, default=1
            Noise draws averaged per image.
        random_state : int, RandomState instance or None, default=None
            Seed of the noise.

        Returns
        -------
        bits_per_dim : float
            Lower is better; ``log2(n_levels)`` is a uniform model.
        """
        X = self._validated(X)
        if not self.dequantize:
            return -self.score(X) / (X.shape[1] * _LOG2)
        return dequantized_bits_per_dim(
            self.score_samples, X, n_draws=n_draws, random_state=random_state
        )

    def transform(self, X):
        """Map images to the flow's standard-normal latent (same size as the image).

        Parameters
        ----------
        X : array-like of shape (n_samples, C*H*W), (n_samples, H, W) or (n_samples, C, H, W)

        Returns
        -------
        Z : ndarray shaped like the data given to :meth:`fit`
        """
        return self._to_fit_layout(super().transform(X))

    def inverse_transform(self, Z):
        """Map latent points back to images (the inverse of :meth:`transform`).

        Parameters
        ----------
        Z : array-like of shape (n_samples, C*H*W), (n_samples, H, W) or (n_samples, C, H, W)

        Returns
        -------
        X : ndarray shaped like the data given to :meth:`fit`
        """
        check_is_fitted(self)
        return self._to_fit_layout(super().inverse_transform(self._as_rows(Z, reset=False)))

    def sample(self, n_samples=1, random_state=None, temperature=1.0):
        """Draw images from the fitted density.

        Parameters
        ----------
        n_samples : int, default=1
            Number of images.
        random_state : int, RandomState instance or None, default=None
            Seed for this draw.
        temperature : float, default=1.0
            Standard deviation of the latent normal; below 1 gives smoother, more typical
            images.

        Returns
        -------
        X : ndarray shaped like the data given to :meth:`fit`
            Continuous pixel values (``np.floor`` gives integer levels).
        """
        check_is_fitted(self)
        n_samples = _check_n_samples(n_samples)
        temperature = _check_temperature(temperature)
        gen = torch.Generator(device=self.device_).manual_seed(
            derive_seed(check_random_state(random_state))
        )
        out = np.empty((n_samples, self.n_features_in_))
        rows = self._inference_rows()
        with torch.inference_mode():
            for start in range(0, n_samples, rows):
                stop = min(start + rows, n_samples)
                x = self.module_.sample(stop - start, gen, temperature)
                out[start:stop] = x.reshape(stop - start, -1).to("cpu", torch.float64).numpy()
        return self._to_fit_layout(out)
