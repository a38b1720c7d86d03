"""Conditioner networks that produce the scale and shift of a coupling."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from .piecewise import PiecewiseLinear, evaluate_table, is_piecewise_linear, piecewise_linear

__all__ = ["ACTIVATIONS", "MLP", "make_activation", "tanh_"]

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

    With one input, ReLU or leaky-ReLU activations and autograd off, a network that
    :func:`sknvp.piecewise.use_tables` switched on evaluates its piecewise-linear table: a
    binary search and a multiply-add per output instead of its layers, the same function to
    rounding (5 times faster scoring of a 2-D flow of 2x128 conditioners).
    :class:`~sknvp.RealNVPDensity` does so for inference; training never does. Without
    autograd on CPU, other networks run their layers as fused shortcuts (in-place
    activations, the bias added in place). A hook on the network, any of its layers or
    global switches the table and the shortcuts off: the layers are then called as modules.

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

    def forward(self, x: Tensor) -> Tensor:
        # The table and the shortcuts below do not call the layers, so hooks would not run.
        if torch.is_grad_enabled() or x.requires_grad or _has_hooks(self):
            return super().forward(x)
        if x.dim() == 2 and x.shape[1] == 1:
            table = self._piecewise_table(x)
            if table is not None:
                return evaluate_table(table, x)
        # Without autograd, activations run in place on the fresh output of the layer before
        # them: one less tensor the size of the hidden layer written and read per activation.
        matrix_on_cpu = x.device.type == "cpu" and x.dim() == 2  # (nn.Linear takes any rank)
        for i, layer in enumerate(self):
            if matrix_on_cpu and _is_plain_linear(layer):
                if layer.in_features == 1:
                    # One input feature (the coupling of 2-D data): the layer is an outer
                    # product plus the bias, which addcmul computes 2-2.5x faster than the
                    # matmul kernel on CPU (2,048 rows, float32 and float64). Equal up to
                    # rounding (FMA).
                    x = torch.addcmul(layer.bias, x, layer.weight.t())
                else:
                    # The product, then the bias added in place: addmm (nn.Linear) first
                    # writes the bias into the whole output and has the kernel add to it,
                    # 20-25 % slower at 4,096 x 64 x 64 on CPU (float32); the same numbers
                    # with torch's MKL kernels, equal to rounding otherwise.
                    x = torch.mm(x, layer.weight.t()).add_(layer.bias)
                continue
            inplace = _INPLACE.get(type(layer)) if i > 0 else None
            x = inplace(layer, x) if inplace is not None else layer(x)
        return x

    def runs_on_columns(self) -> bool:
        """Whether :meth:`forward_columns` applies: plain ``nn.Linear`` layers with biases
        and activations with an in-place form, no hooks."""
        # MLP's own layout: layers at even positions, activations between them.
        return len(self) % 2 == 1 and all(
            _is_plain_linear(layer) if i % 2 == 0 else type(layer) in _INPLACE
            for i, layer in enumerate(self)
        ) and not _has_hooks(self)

    def forward_columns(self, x_t: Tensor) -> Tensor:
        """The network applied to each column of ``x_t`` (features by rows): ``self(x_t.T).T``
        as ``W @ x_t + b``, activations in place, for inference (autograd off) on networks
        that :meth:`runs_on_columns`. The output's rows are contiguous, so a coupling's
        scale and shift are row blocks rather than strided columns: element-wise passes
        over a few features of many rows then stream along the rows (a matched 10-D flow
        scored 1.17 times faster this way; see the benchmarks)."""
        for i, layer in enumerate(self):
            if i % 2 == 0:
                x_t = torch.mm(layer.weight, x_t).add_(layer.bias.unsqueeze(1))
            else:
                x_t = _INPLACE[type(layer)](layer, x_t)
        return x_t

    def _piecewise_table(self, x: Tensor) -> PiecewiseLinear | None:
        """The network as its piecewise-linear table (:mod:`sknvp.piecewise`) for inference
        on one input feature, where :func:`~sknvp.piecewise.use_tables` switched tables on:
        built on first use and kept while the parameters stay the same tensors with the same
        version counters and the same sums (fused optimizer kernels update parameters
        without bumping their versions). None where the network is not of that form."""
        if not self.__dict__.get("_use_tables") or not is_piecewise_linear(self):
            return None  # (checked before the parameter sums: tanh nets never pay for them)
        # forward() comes here with autograd off and no hooks only
        params = list(self.parameters())
        sums = torch.stack([p.sum(dtype=torch.float64) for p in params]).cpu()
        key = (tuple((p.data_ptr(), p._version) for p in params), x.dtype, x.device)
        cache = self.__dict__.get("_piecewise_cache")
        if cache is not None and cache[0] == key and torch.equal(cache[1], sums):
            return cache[2]
        table = piecewise_linear(self)
        if table is not None:
            table = table.to(device=x.device, dtype=x.dtype)
        self.__dict__["_piecewise_cache"] = (key, sums, table)
        return table

    def __getstate__(self):
        state = self.__dict__.copy()
        # Neither travels: a copy that trains must run its layers, and tables are rebuilt.
        state.pop("_piecewise_cache", None)
        state.pop("_use_tables", None)
        return state


def _has_hooks(net: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()) or bool(
        getattr(_torch_module, "_global_forward_hooks", None)
        or getattr(_torch_module, "_global_forward_pre_hooks", None)
    )


def _is_plain_linear(layer: nn.Module) -> bool:
    # Exactly nn.Linear (not a subclass with its own forward), with a bias.
    return type(layer) is nn.Linear and layer.bias is not None


def tanh_(x: Tensor) -> Tensor:
    r"""``x.tanh_()``, computed on CPU as :math:`2\sigma(2x) - 1` (the same function).

    torch's CPU ``tanh`` was not vectorised on the machine measured (4-9 ns per element, where
    ``sigmoid`` takes 1-2 ns): the sigmoid form was 1.2 to 3.5 times faster from 2,048 to
    262,144 elements, float32 and float64 alike. Near 0 its error is absolute (about one unit
    in the last place of 1) rather than relative, which is below anything a log-density can
    resolve. For inference only (it writes into ``x``): autograd keeps ``torch.tanh``. Other
    devices use ``x.tanh_()``.

    Parameters
    ----------
    x : Tensor
        Overwritten with its hyperbolic tangent.

    Returns
    -------
    Tensor
        ``x`` itself.

    Examples
    --------
    >>> import torch
    >>> from sknvp.nets import tanh_
    >>> x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    >>> y = tanh_(x.clone())
    >>> bool(torch.allclose(y, torch.tanh(x), rtol=0, atol=1e-15))
    True
    """
    if x.device.type != "cpu":
        return x.tanh_()
    two, one = constant_like(2.0, x), constant_like(1.0, x)
    return x.mul_(two).sigmoid_().mul_(two).sub_(one)


_CONSTANTS: dict[tuple, Tensor] = {}


def constant_like(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device, made once and kept.

    A Python float in an operation on a float32 tensor is wrapped as a float64 tensor and
    converted on every call (7 against 3 us for a small multiply; a third of the sigmoid form
    of :func:`tanh_` at 512 x 32). The results are the same: the value is converted once
    instead of on every call.
    """
    key = (value, like.dtype, like.device)
    const = _CONSTANTS.get(key)
    if const is None:
        const = _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return const


# In-place forms of the registry's activations, used by MLP when autograd is off. The input
# of an activation inside MLP is always the output of the Linear before it, never the caller's.
_INPLACE: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    nn.ReLU: lambda m, x: x.relu_(),
    nn.Tanh: lambda m, x: tanh_(x),
    nn.LeakyReLU: lambda m, x: torch.nn.functional.leaky_relu_(x, m.negative_slope),
    nn.ELU: lambda m, x: torch.nn.functional.elu_(x, m.alpha),
}


def zero_last_layer(module: nn.Module) -> None:
    """Zero the last ``nn.Linear`` or ``nn.Conv2d`` of ``module`` (identity-start helper)."""
    last = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
