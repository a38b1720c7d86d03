"""Pure mask factories for coupling layers.

Every factory returns a ``torch.BoolTensor``. ``True`` marks the *conditioning* part
:math:`x_a` of a coupling (kept unchanged and fed to the conditioner network); ``False``
marks the part :math:`x_b` that the coupling transforms.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MASK_TYPES",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "coupling_masks",
    "parity_mask",
]

MASK_TYPES = ("alternating", "checkerboard", "fixed", "permuted", "random")


def alternating_mask(n_features: int, parity: int = 0) -> Tensor:
    """Halves mask: the first ``n_features // 2`` features are kept when ``parity`` is 0.

    With ``parity`` 1 the complement is kept. With one feature and parity 0 nothing is kept,
    so the coupling transforms that feature with a conditioner that sees no input.
    """
    mask = torch.arange(n_features) < n_features // 2
    return mask if parity % 2 == 0 else ~mask


def parity_mask(n_features: int, parity: int = 0) -> Tensor:
    """Odd/even mask on a vector: features whose index has parity ``1 - parity`` are kept.

    ``parity_mask(4, 0)`` keeps indices 1 and 3; with one feature and parity 0 nothing is kept.
    """
    return torch.arange(n_features) % 2 != parity % 2


def checkerboard_mask(height: int, width: int, parity: int = 0) -> Tensor:
    """Spatial checkerboard of shape ``(height, width)``.

    With ``parity`` 0 the pixels whose coordinate sum is odd are kept, as in the Real-NVP paper.
    """
    rows = torch.arange(height).unsqueeze(1)
    cols = torch.arange(width).unsqueeze(0)
    return (rows + cols) % 2 != parity % 2


def channel_mask(n_channels: int, parity: int = 0) -> Tensor:
    """Channel-wise mask of shape ``(n_channels,)``: the first half is kept for parity 0."""
    return alternating_mask(n_channels, parity)


def _random_masks(
    n_couplings: int, n_features: int, generator: torch.Generator | None
) -> Tensor:
    n_kept = n_features // 2
    masks = torch.zeros(n_couplings, n_features, dtype=torch.bool)
    for i in range(n_couplings):
        kept = torch.randperm(n_features, generator=generator)[:n_kept]
        masks[i, kept] = True
    return masks


def _permuted_masks(
    n_couplings: int, n_features: int, generator: torch.Generator | None
) -> Tensor:
    masks = torch.zeros(n_couplings, n_features, dtype=torch.bool)
    order = torch.arange(n_features)  # the first pair alternates the halves in index order
    for i in range(n_couplings):
        if i % 2 == 0:
            if i > 0:
                order = torch.randperm(n_features, generator=generator)
            kept = torch.zeros(n_features, dtype=torch.bool)
            kept[order[: n_features // 2]] = True
            # Keeping what the coupling before kept would stack two affine maps of the same
            # features on the same condition, which is one map: keep the complement then.
            if i > 0 and bool((kept == masks[i - 1]).all()):
                kept = ~kept
        else:
            kept = ~masks[i - 1]
        masks[i] = kept
    return masks


def coupling_masks(
    kind: str, n_features: int, n_couplings: int, generator: torch.Generator | None = None
) -> Tensor:
    """Stack of masks of shape ``(n_couplings, n_features)`` for a vector flow.

    Parameters
    ----------
    kind : {"alternating", "checkerboard", "fixed", "permuted", "random"}
        ``"alternating"`` keeps the first and the second half in turn; ``"checkerboard"`` keeps
        odd and even indices in turn; ``"fixed"`` keeps the same first half in every coupling
        (so those features are never transformed: kept to show why that fails);
        ``"permuted"`` alternates the two halves of a permutation of the features: index
        order for the first two couplings, then a fresh random permutation drawn from
        ``generator`` for every later pair (so each pair transforms every feature, and
        features are conditioned on different partners; with two features it equals
        ``"alternating"``); ``"random"`` keeps an independent random ``n_features // 2``
        subset per coupling drawn from ``generator`` (a feature can then be kept by every
        coupling).
    n_features, n_couplings : int
        Shape of the stack.
    generator : torch.Generator, optional
        Source of randomness for ``"random"``.
    """
    if kind == "random":
        return _random_masks(n_couplings, n_features, generator)
    if kind == "permuted":
        return _permuted_masks(n_couplings, n_features, generator)
    factory = {"alternating": alternating_mask, "checkerboard": parity_mask}
    if kind == "fixed":
        return alternating_mask(n_features, 0).expand(n_couplings, n_features).clone()
    if kind not in factory:
        raise ValueError(f"Unknown mask type {kind!r}; expected one of {MASK_TYPES}.")
    return torch.stack([factory[kind](n_features, i) for i in range(n_couplings)])
