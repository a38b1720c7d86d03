"""Conditioner networks that produce the scale and shift of a coupling."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "MLP", "make_activation"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def make_activation(activation: str | Callable[[], nn.Module]) -> nn.Module:
    """Build an activation module from a registry name or a zero-argument factory."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}."
            )
        return ACTIVATIONS[activation]()
    module = activation()
    if not isinstance(module, nn.Module):
        raise TypeError(f"activation() must return an nn.Module, got {type(module).__name__}.")
    return module


class MLP(nn.Sequential):
    """Fully connected network ``in_features -> hidden... -> out_features``.

    The last layer starts at zero, so a coupling built on it starts as the identity map.

    Parameters
    ----------
    in_features, out_features : int
        Input and output widths.
    hidden_layer_sizes : sequence of int
        Width of each hidden layer; its length is the depth.
    activation : str or callable, default="relu"
        Name in :data:`ACTIVATIONS` or a factory returning an ``nn.Module``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_layer_sizes: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = "relu",
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_layer_sizes:
            layers += [nn.Linear(width, int(size)), make_activation(activation)]
            width = int(size)
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - same as nn.Sequential
        return super().forward(x)


def zero_last_layer(module: nn.Module) -> None:
    """Zero the last ``nn.Linear`` or ``nn.Conv2d`` of ``module`` (identity-start helper)."""
    last = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
