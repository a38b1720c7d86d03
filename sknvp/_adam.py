"""One Adam step by torch's fused kernel, without ``Optimizer.step``'s per-step work (torch only).

At the benchmark's matched size (8 couplings, 48 parameter tensors, about 60,000 numbers) a
fused ``torch.optim.Adam.step()`` on CPU takes 0.7 to 1 ms, of which the kernel that updates
the numbers is a seventh: the rest is per-step bookkeeping that does not change during a fit
(collecting each group's tensors, grouping them by device and dtype) and the step counters, one
0-d tensor per parameter incremented by a ``_foreach_add_`` that CPU runs one tensor at a time
(about 4 us each). That is a tenth of a training step of a 455-row set and a sixth of a
512-row step at 50 features.

:class:`FusedAdamStep` collects the lists once and keeps each group's step counters as views of
one tensor, so a step is one ``add_`` and one ``torch._fused_adam_`` call per group: the very
kernel ``Adam.step()`` calls, with the same arguments, so the numbers are the same to the bit
(``tests/test_adam.py``). The optimizer's ``state`` stays the one ``Adam.step()`` reads and
writes, so either can take the next step and ``state_dict()`` is unchanged in form.
:func:`fused_adam_step` returns ``None`` (use ``optimizer.step``) for anything else: another
optimizer class, a build without the fused kernel, amsgrad, maximize, capturable,
differentiable, decoupled weight decay, a tensor learning rate, step hooks, parameters off
the CPU, or parameters of several dtypes in one group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FusedAdamStep", "fused_adam_step"]

_UNSUPPORTED_FLAGS = (
    "amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay",
)


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as _optim

    own = (getattr(optimizer, "_optimizer_step_pre_hooks", None),
           getattr(optimizer, "_optimizer_step_post_hooks", None))
    glob = (getattr(_optim, "_global_optimizer_pre_hooks", None),
            getattr(_optim, "_global_optimizer_post_hooks", None))
    return any(own) or any(glob)


def _supported(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer) is not torch.optim.Adam or not hasattr(torch, "_fused_adam_"):
        return False
    if _has_step_hooks(optimizer):
        return False
    for group in optimizer.param_groups:
        if not group.get("fused") or any(group.get(k, False) for k in _UNSUPPORTED_FLAGS):
            return False
        if torch.is_tensor(group["lr"]) or any(torch.is_tensor(b) for b in group["betas"]):
            return False
        params = group["params"]
        # CPU only: that is where the bookkeeping was measured to cost more than the kernel;
        # on accelerators Adam.step() stays (not measured here, and not tested without one).
        if any(p.device.type != "cpu" for p in params) or len({p.dtype for p in params}) > 1:
            return False
        if any(p.is_complex() or p.is_sparse for p in params):
            return False
    return True


class FusedAdamStep:
    """``step()`` equal to ``optimizer.step()`` for a fused ``torch.optim.Adam`` whose
    parameters all have a dense gradient (any step with a missing gradient is left to
    ``optimizer.step()``).

    Made with :func:`fused_adam_step`. The state of parameters that have none yet is created
    as ``Adam.step()`` would create it; each group's ``state[p]["step"]`` becomes a view of one
    tensor of that group's counters (:meth:`release` turns them back into separate tensors).
    """

    def __init__(self, optimizer: torch.optim.Adam) -> None:
        self.optimizer = optimizer
        self._groups: list[tuple[dict, list, list, list, Tensor, list]] = []
        for group in optimizer.param_groups:
            params = list(group["params"])
            if not params:
                continue
            states = [self._state(p) for p in params]
            counters = torch.stack([s["step"].detach().reshape(()) for s in states]).float()
            steps = list(counters.unbind())
            for state, view in zip(states, steps, strict=True):
                state["step"] = view
            self._groups.append((
                group,
                params,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                counters,
                steps,
            ))

    def _state(self, p: Tensor) -> dict:
        state = self.optimizer.state[p]
        if len(state) == 0:  # as Adam.step() initialises a fused group's state
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def step(self) -> None:
        grads_per_group = []
        for _, params, *_rest in self._groups:
            grads = [p.grad for p in params]
            if any(g is None or g.is_sparse for g in grads):
                self.optimizer.step()
                return
            grads_per_group.append(grads)
        with torch.no_grad():
            for (group, params, exp_avgs, exp_avg_sqs, counters, steps), grads in zip(
                self._groups, grads_per_group, strict=True
            ):
                beta1, beta2 = group["betas"]
                counters.add_(1)
                torch._fused_adam_(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps,
                    lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"],
                    amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
                )

    def release(self) -> None:
        """Give each parameter its own step counter again (the values are kept)."""
        for _, params, _, _, _, steps in self._groups:
            for p, view in zip(params, steps, strict=True):
                self.optimizer.state[p]["step"] = view.clone()
        self._groups = []


def fused_adam_step(optimizer: torch.optim.Optimizer) -> FusedAdamStep | None:
    """A :class:`FusedAdamStep` for ``optimizer``, or None where it does not apply."""
    try:
        return FusedAdamStep(optimizer) if _supported(optimizer) else None
    except (RuntimeError, TypeError, ValueError):  # an unexpected state layout: plain step
        return None


def step_function(
    optimizer: torch.optim.Optimizer,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(step, release)``: the fast step where it applies, else ``optimizer.step`` and a
    no-op."""
    fast = fused_adam_step(optimizer)
    if fast is None:
        return optimizer.step, lambda: None
    return fast.step, fast.release
