r"""The negative log-likelihood's gradient of a vector Real-NVP flow, derived by hand (torch only).

A training step of a small flow is dominated by the number of operations, not by arithmetic:
at 512 rows and 64 hidden units an autograd step dispatches over two thousand ATen calls of a
few microseconds each (forward, the recorded graph, backward and their views and copies),
while its matrix products take a quarter of the time. The chain rule of an affine coupling is
short enough to write out, so :class:`ManualGradient` computes the loss and every parameter's
gradient with about forty tensor operations per coupling (two hidden layers) and no autograd
graph.

For a coupling with kept part :math:`x_a`, transformed part :math:`x_b`, conditioner output
:math:`(\tilde s, t) = g(x_a)`, log-scale :math:`s = \beta\tanh(\tilde s/\beta)` and
:math:`y_b = x_b e^{s} + t`, the weighted loss :math:`L = -\sum_i w_i \log p(x_i)` (weights
summing to one) gives, from the gradient :math:`\bar y` of the layers above,

.. math::
    \bar t = \bar y_b, \quad \bar s = \bar y_b \odot x_b e^{s} - w, \quad
    \bar{\tilde s} = \bar s \odot (1 - \tanh^2(\tilde s/\beta)), \quad
    \bar x_b = \bar y_b \odot e^{s}, \quad \bar x_a = \bar y_a + J_g^\top (\bar{\tilde s}, \bar t),

with :math:`J_g^\top` the conditioner's backward pass (matrix products and the activation's
derivative). A standard normal base gives :math:`\bar z = w \odot z`. A Gaussian-mixture base
(:class:`~sknvp.mixture.GaussianMixtureBase`) with standardised residuals
:math:`\varepsilon_k = P_k^\top (z - \mu_k)` and responsibilities :math:`r_k` gives
:math:`\bar\varepsilon_k = w r_k \varepsilon_k`, :math:`\bar z = \sum_k P_k
\bar\varepsilon_k`, :math:`\bar\mu_k = -P_k \sum_i \bar\varepsilon_{ik}`,
:math:`\bar P_k = \sum_i (z_i - \mu_k) \bar\varepsilon_{ik}^\top` (plus
:math:`-\sum_i w_i r_{ik}` on each log-diagonal entry, from the log-determinant) and
:math:`\bar\ell = \mathrm{softmax}(\ell) - \sum_i w_i r_i` for the weights' logits.
``tests/test_backprop.py`` checks every gradient against autograd.

Supported: a :class:`~sknvp.flows.RealNVPFlow` (standard normal or Gaussian-mixture base) whose
layers are
:class:`~sknvp.transforms.Standardize`, :class:`~sknvp.transforms.TriangularWhitening`,
:class:`~sknvp.power.YeoJohnson`, :class:`~sknvp.power.SinhArcsinh` (all fixed, before any
coupling) and
:class:`~sknvp.transforms.SplitAffineCoupling` with an
:class:`~sknvp.nets.MLP` conditioner of plain ``nn.Linear`` layers and the registry's
activations, without hooks, frozen parameters or clipped conditioner inputs.
:func:`manual_gradient` returns ``None`` for anything else (batch norm, images, one-feature
flows, custom layers or activations), and training falls back to autograd.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._reduce import logsumexp, softmax_from, sum_last
from .flows import RealNVPFlow
from .mixture import GaussianMixtureBase, standardized_residuals
from .nets import MLP, constant_like, tanh_
from .power import SinhArcsinh, YeoJohnson
from .transforms import (
    SplitAffineCoupling,
    Standardize,
    TriangularWhitening,
    _CouplingRun,
    coupling_runs,
    global_hooks,
    has_hooks,
)

__all__ = ["ManualGradient", "manual_gradient"]

_aten = torch.ops.aten
# Elements from which tanh_'s sigmoid form (four in-place operations) beats torch.tanh (one) in
# a training step: about 4 % of a step at 512 x 32 (digits), no difference at 455 x 15.
_SIGMOID_TANH_MIN = 8192

# activation type -> (forward: (module, pre-activation) -> (output, saved),
#                     backward: (module, grad of output, saved) -> grad of pre-activation).
# Forward may overwrite its input: it is always the fresh output of the layer before.
_ACTIVATIONS: dict[type, tuple[Callable, Callable]] = {
    nn.ReLU: (
        lambda m, h: (h.relu_(),) * 2,
        lambda m, g, a: _aten.threshold_backward(g, a, 0),
    ),
    nn.Tanh: (
        lambda m, h: (tanh_(h),) * 2,  # the sigmoid form on CPU, as inference computes it
        lambda m, g, a: _aten.tanh_backward(g, a),
    ),
    nn.LeakyReLU: (
        lambda m, h: (F.leaky_relu(h, m.negative_slope), h),
        lambda m, g, h: _aten.leaky_relu_backward(g, h, m.negative_slope, False),
    ),
    nn.ELU: (
        lambda m, h: (F.elu(h, m.alpha), h),
        lambda m, g, h: _aten.elu_backward(g, m.alpha, 1.0, 1.0, False, h),
    ),
    nn.GELU: (
        lambda m, h: (F.gelu(h, approximate=m.approximate), h),
        lambda m, g, h: _aten.gelu_backward(g, h, approximate=m.approximate),
    ),
    nn.SiLU: (
        lambda m, h: (F.silu(h), h),
        lambda m, g, h: _aten.silu_backward(g, h),
    ),
}


def _has_hooks(module: nn.Module) -> bool:
    return any(map(has_hooks, module.modules()))


def _mlp_layers(net: nn.Module) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """``[(linear, activation or None), ...]`` of a plain MLP, or None if it is not one."""
    if type(net) is not MLP:
        return None
    mods = list(net)
    if len(mods) % 2 != 1:
        return None
    pairs = []
    for i in range(0, len(mods), 2):
        lin = mods[i]
        act = mods[i + 1] if i + 1 < len(mods) else None
        if type(lin) is not nn.Linear or lin.bias is None:
            return None
        if act is not None and type(act) not in _ACTIVATIONS:
            return None
        pairs.append((lin, act))
    return pairs


class _Coupling:
    """One :class:`SplitAffineCoupling` unrolled into its layers.

    The weights, biases and activation functions are looked up once (``nn.Module`` attribute
    access costs about a microsecond each, a tenth of a small operation); parameters keep their
    identity through training (optimizer steps and ``load_state_dict`` write in place).
    """

    def __init__(self, layer: SplitAffineCoupling, layers) -> None:
        # The layer's own split and join (slices for block masks, gathers otherwise).
        self.split, self.join = layer._split, layer._join
        self.inv_bound = 1.0 / layer.scale_bound
        self.bound = layer.scale_bound
        self.d_free = layer._free_idx.numel()
        self.weights = [lin.weight for lin, _ in layers]
        self.biases = [lin.bias for lin, _ in layers]
        self.acts = [
            None if act is None else (
                functools.partial(_ACTIVATIONS[type(act)][0], act),
                functools.partial(_ACTIVATIONS[type(act)][1], act),
            )
            for _, act in layers
        ]
        self.single_input = layers[0][0].in_features == 1
        self.layer = layer  # its index sets group it into runs (see ManualGradient.runs)

    def forward_parts(self, x_kept: Tensor, x_free: Tensor):
        """``(y_free, s, cache)``: the transformed part (the kept part passes unchanged)."""
        inputs, saved = [x_kept], []  # each linear layer's input; each activation's saved
        h = x_kept
        for j, (weight, bias, act) in enumerate(zip(self.weights, self.biases, self.acts)):
            if j == 0 and self.single_input:
                # An outer product plus the bias: addcmul is 1.5-2.5x faster than the matmul
                # kernel for one input feature (the couplings of 2-D data).
                h = torch.addcmul(bias, h, weight.t())
            else:
                h = F.linear(h, weight, bias)
            if act is not None:
                h, keep = act[0](h)
                inputs.append(h)
                saved.append(keep)
        d = self.d_free
        # 0-d tensors of h's dtype: Python floats would be converted on every call
        inv_bound, bound = constant_like(self.inv_bound, h), constant_like(self.bound, h)
        th = h[:, :d] * inv_bound
        # torch's CPU tanh is not vectorised (44 us on 512 x 32 float32 against 8 for sigmoid);
        # the sigmoid form's extra operations cost more than they save on small tensors.
        th = tanh_(th) if th.numel() >= _SIGMOID_TANH_MIN else th.tanh_()
        s = th * bound
        es = torch.exp(s)
        x_es = x_free * es
        return x_es + h[:, d:], s, (inputs, saved, th, es, x_es)

    def forward(self, x: Tensor):
        x_kept, x_free = self.split(x)
        y_free, s, cache = self.forward_parts(x_kept, x_free)
        return self.join(x_kept, y_free), s, cache

    def backward_parts(
        self, g_kept: Tensor, g_free: Tensor, neg_w: Tensor, cache, need_input_grad: bool
    ):
        """Writes the parameters' gradients; returns the gradients of the coupling's kept and
        free inputs (None if not ``need_input_grad``)."""
        inputs, saved, th, es, x_es = cache
        g_s = torch.addcmul(neg_w, g_free, x_es)
        g_h = torch.cat([_aten.tanh_backward(g_s, th), g_free], dim=1)
        weights, acts = self.weights, self.acts
        for j in range(len(weights) - 1, 0, -1):
            torch.mm(g_h.t(), inputs[j], out=weights[j].grad)
            torch.sum(g_h, 0, out=self.biases[j].grad)
            g_h = acts[j - 1][1](torch.mm(g_h, weights[j]), saved[j - 1])
        torch.mm(g_h.t(), inputs[0], out=weights[0].grad)
        torch.sum(g_h, 0, out=self.biases[0].grad)
        if not need_input_grad:
            return None
        return torch.addmm(g_kept, g_h, weights[0]), g_free * es

    def backward(self, g_y: Tensor, neg_w: Tensor, cache, need_input_grad: bool):
        g_kept, g_free = self.split(g_y)
        grads = self.backward_parts(g_kept, g_free, neg_w, cache, need_input_grad)
        return None if grads is None else self.join(*grads)


class _MixtureBase:
    """The negative log-likelihood of a :class:`GaussianMixtureBase` and its gradients."""

    def __init__(self, base: GaussianMixtureBase) -> None:
        self.base = base
        self.params = (base.logits, base.means, base.log_diag, base.upper)

    def loss_and_grad(self, z: Tensor, w_col: Tensor) -> tuple[Tensor, Tensor]:
        """``-sum_i w_i log p(z_i)`` (``w_col`` of shape (n, 1) or (1, 1), summing to one over
        the rows); writes the base's parameter gradients and returns the gradient in ``z``."""
        base = self.base
        n, D = z.shape
        K = base.n_components
        prec = base.precisions_cholesky()
        eps = standardized_residuals(z, base.means, prec)
        lp = torch.log_softmax(base.logits, 0) + base.log_diag.sum(1) - D * _HALF_LOG_2PI
        lp = lp - 0.5 * sum_last(eps * eps)  # (n, K): log pi_k + log N(z_i; mu_k, Sigma_k)
        lse = logsumexp(lp, 1, keepdim=True)
        loss = -(lse * w_col).sum()
        wr = softmax_from(lp, lse).mul_(w_col)  # w_i r_ik
        g_eps = (eps * wr.unsqueeze(2)).reshape(n, K * D)
        g_z = g_eps @ prec.transpose(1, 2).reshape(K * D, D)  # sum_k P_k g_eps_k
        col = g_eps.sum(0).view(K, D)  # sum over rows of each component's residual gradient
        resp = wr.sum(0)  # sum_i w_i r_ik
        g_prec = (z.t() @ g_eps).view(D, K, D).permute(1, 0, 2)
        g_prec = g_prec - base.means.unsqueeze(2) * col.unsqueeze(1)
        g_logits, g_means, g_log_diag, g_upper = (p.grad for p in self.params)
        g_logits.copy_(torch.softmax(base.logits, 0) - resp)
        g_means.copy_(torch.einsum("kde,ke->kd", prec, col).neg_())
        g_log_diag.copy_(torch.diagonal(g_prec, dim1=1, dim2=2) * torch.exp(base.log_diag))
        g_log_diag.sub_(resp.unsqueeze(1))
        g_upper.copy_(g_prec * base._strict_upper)
        return loss, g_z


class ManualGradient:
    """Loss and parameter gradients of a supported flow without autograd.

    Use :func:`manual_gradient` to build one (it checks the flow is supported).
    """

    def __init__(
        self,
        flow: RealNVPFlow,
        prefix: list[nn.Module],
        couplings: list[_Coupling],
        base: _MixtureBase | None = None,
    ):
        self.flow = flow
        self.prefix = prefix
        self.prefix_varies = any(type(m) in (YeoJohnson, SinhArcsinh) for m in prefix)
        self.couplings = couplings
        self.base = base
        self.params = list(flow.parameters())
        self._checked_grads: list = [_UNCHECKED] * len(self.params)
        # Consecutive couplings that split into the same two index sets form a run (masks
        # "alternating" and "checkerboard": one run; "permuted": one per pair of couplings);
        # each run splits its input once and joins once, its couplings work on the two
        # parts (see _forward_runs). None: every coupling splits and joins (the reference).
        self.runs: list[_CouplingRun] | None = coupling_runs([c.layer for c in couplings])

    def couplings_are_identity(self) -> bool:
        """Whether every coupling's conditioner ends in a zero layer (as a fresh flow's do):
        then each coupling maps its input to itself with log-determinant 0."""
        return not any(
            bool(c.weights[-1].any()) or bool(c.biases[-1].any()) for c in self.couplings
        )

    @torch.no_grad()
    def log_prob_without_couplings(self, x: Tensor) -> Tensor:
        """The flow's log-density of each row of ``x`` where :meth:`couplings_are_identity`
        holds: the fixed layers before the couplings and the base, without the conditioners'
        arithmetic (an initial score at a third of a training pass's cost or less)."""
        x, log_det = self._through_prefix(x)
        return self.flow.base_log_prob(x) + log_det

    def _through_prefix(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        """The fixed layers before the couplings: their output and summed log-determinant
        (per row; 0.0 without any)."""
        log_det = 0.0
        for layer in self.prefix:
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def _ensure_grads(self) -> None:
        # The gradients are written in place (``out=``) into buffers kept between steps. The
        # buffers checked last time are usually still there: an identity check of each (a
        # tenth of the full check, which cost 60 us a step at the matched size).
        grads = [p.grad for p in self.params]
        if all(map(operator.is_, grads, self._checked_grads)):
            return
        for p in self.params:
            if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        self._checked_grads = [p.grad for p in self.params]

    @torch.no_grad()
    def loss_and_grad(self, x: Tensor, w: Tensor | None = None) -> Tensor:
        """Weighted mean negative log-likelihood of ``x``; parameter ``.grad`` set to its
        gradient (overwritten, not accumulated). Returns the loss as a 0-d tensor."""
        self._ensure_grads()
        n = x.shape[0]
        x, log_det = self._through_prefix(x)
        if not self.prefix:
            const = 0.0
        elif self.prefix_varies:  # a Yeo-Johnson or tail layer: its log-det differs by row
            const = log_det.mean() if w is None else torch.dot(log_det, w) / w.sum()
        else:
            const = log_det[0]  # affine layers: the same log-det for every row
        if self.runs is None:
            z, s_total, caches = self._forward(x, w)
        else:
            z, s_total, caches = self._forward_runs(x, w)
        if self.base is not None:
            w_col = z.new_full((1, 1), 1.0 / n) if w is None else (w / w.sum()).reshape(n, 1)
            loss, g = self.base.loss_and_grad(z, w_col)
            s_mean = s_total / n if w is None else torch.dot(s_total, w_col.reshape(-1))
            loss = loss - s_mean - const
        elif w is None:
            # mean over rows of 0.5 |z|^2 - sum s, plus the constants
            sq = torch.dot(z.reshape(-1), z.reshape(-1))
            loss = (0.5 * sq - s_total) / n + 0.5 * z.shape[1] * _LOG_2PI - const
            w_col = z.new_full((1, 1), 1.0 / n)  # broadcasts over the rows
            g = z * w_col
        else:
            w_col = (w / w.sum()).reshape(n, 1)
            per_row = 0.5 * (z * z).sum(1) - s_total
            loss = torch.dot(per_row, w_col.reshape(-1)) + 0.5 * z.shape[1] * _LOG_2PI - const
            g = z * w_col
        neg_w = -w_col
        if self.runs is None:
            for i in range(len(self.couplings) - 1, -1, -1):
                g = self.couplings[i].backward(g, neg_w, caches[i], need_input_grad=i > 0)
        else:
            self._backward_runs(g, neg_w, caches)
        return loss

    def _forward(self, x: Tensor, w: Tensor | None):
        caches, s_total = [], None
        for c in self.couplings:
            x, s, cache = c.forward(x)
            caches.append(cache)
            s_sum = s.sum(1) if w is not None else s.sum()
            s_total = s_sum if s_total is None else s_total + s_sum
        return x, s_total, caches

    def _forward_runs(self, x: Tensor, w: Tensor | None):
        # Within a run the two parts stay apart: no split and no join per coupling (about a
        # sixth of a coupling's operations, each a few microseconds at these sizes).
        caches, s_total = [], None
        for run in self.runs:
            left, right = run.split(x)
            for c, kept_left in zip(
                self.couplings[run.start:run.stop], run.kept_left, strict=True
            ):
                if kept_left:
                    right, s, cache = c.forward_parts(left, right)
                else:
                    left, s, cache = c.forward_parts(right, left)
                caches.append(cache)
                s_sum = s.sum(1) if w is not None else s.sum()
                s_total = s_sum if s_total is None else s_total + s_sum
            x = run.join(left, right)
        return x, s_total, caches

    def _backward_runs(self, g: Tensor, neg_w: Tensor, caches) -> None:
        for run in reversed(self.runs):
            g_left, g_right = run.split(g)
            for i in range(run.stop - 1, run.start - 1, -1):
                c, need = self.couplings[i], i > 0
                if run.kept_left[i - run.start]:
                    grads = c.backward_parts(g_left, g_right, neg_w, caches[i], need)
                    if grads is not None:
                        g_left, g_right = grads
                else:
                    grads = c.backward_parts(g_right, g_left, neg_w, caches[i], need)
                    if grads is not None:
                        g_right, g_left = grads
            if run.start > 0:
                g = run.join(g_left, g_right)


_LOG_2PI = math.log(2 * math.pi)
_UNCHECKED = object()  # no gradient tensor is this: the first _ensure_grads checks them all
_HALF_LOG_2PI = 0.5 * _LOG_2PI


_FIXED_LAYERS = (Standardize, TriangularWhitening, YeoJohnson, SinhArcsinh)


def manual_gradient(module: nn.Module) -> ManualGradient | None:
    """A :class:`ManualGradient` for ``module``, or None where it is not supported."""
    if type(module) is not RealNVPFlow or global_hooks() or _has_hooks(module):
        return None
    layers = list(module.transform)
    prefix: list[nn.Module] = []
    couplings: list[_Coupling] = []
    for layer in layers:
        if type(layer) in _FIXED_LAYERS and not couplings:
            prefix.append(layer)
        elif type(layer) is SplitAffineCoupling:
            if layer.input_low is not None:  # clipped inputs: autograd differentiates the clamp
                return None
            mlp = _mlp_layers(layer.conditioner)
            if mlp is None or mlp[-1][0].out_features != 2 * layer._free_idx.numel():
                return None
            couplings.append(_Coupling(layer, mlp))
        else:
            return None
    if not couplings or any(p.requires_grad is False for p in module.parameters()):
        return None
    if module.base is not None and type(module.base) is not GaussianMixtureBase:
        return None
    base = None if module.base is None else _MixtureBase(module.base)
    return ManualGradient(module, prefix, couplings, base)
