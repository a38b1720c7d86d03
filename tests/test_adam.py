"""The direct fused Adam step (sknvp._adam) against torch's own ``Adam.step()``."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from sknvp._adam import fused_adam_step, step_function
from sknvp._training import make_adam

needs_fused = pytest.mark.skipif(
    fused_adam_step(torch.optim.Adam([nn.Parameter(torch.zeros(1))], fused=True)) is None
    if hasattr(torch, "_fused_adam_") else True,
    reason="this torch build has no fused CPU Adam kernel",
)


class _TwoGroups(nn.Module):
    """A transform part (decayed) and a ``base`` part (not), as make_adam splits them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
        self.base = nn.Linear(4, 2)


def _pair(weight_decay=1e-3):
    torch.manual_seed(0)
    a = _TwoGroups()
    b = copy.deepcopy(a)
    return a, make_adam(a, 1e-2, weight_decay), b, make_adam(b, 1e-2, weight_decay)


def _set_grads(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _assert_same(a, opt_a, b, opt_b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        if not sa:  # never stepped by Adam; the fast step made its state at zero
            assert float(sb["step"]) == 0 and not sb["exp_avg"].any()
            continue
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k


@needs_fused
def test_the_fast_step_equals_adam_step_to_the_bit():
    a, opt_a, b, opt_b = _pair()
    fast = fused_adam_step(opt_b)
    assert fast is not None
    for i in range(6):
        for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
            group_a["lr"] = group_b["lr"] = 1e-2 / (i + 1)  # as a schedule changes it
        _set_grads(a, i)
        _set_grads(b, i)
        opt_a.step()
        fast.step()
        _assert_same(a, opt_a, b, opt_b)
    assert float(opt_b.state[next(b.parameters())]["step"]) == 6.0


@needs_fused
def test_adam_step_continues_after_fast_steps_and_the_state_dict_round_trips():
    a, opt_a, b, opt_b = _pair()
    step, release = step_function(opt_b)
    for i in range(3):
        _set_grads(a, i)
        _set_grads(b, i)
        opt_a.step()
        step()
    # torch's own step on the counters the fast step made views of, before and after release
    _set_grads(a, 3)
    _set_grads(b, 3)
    opt_a.step()
    opt_b.step()
    _assert_same(a, opt_a, b, opt_b)
    release()
    counters = [opt_b.state[p]["step"] for p in b.parameters()]
    assert all(c._base is None for c in counters)  # separate tensors again
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    fresh = make_adam(b, 1e-2, 1e-3)
    fresh.load_state_dict(torch.load(buf))
    _set_grads(a, 4)
    _set_grads(b, 4)
    opt_a.step()
    fresh.step()
    _assert_same(a, opt_a, b, fresh)
    assert pickle.loads(pickle.dumps(opt_b.state_dict()))["state"][0]["step"] == 4


@needs_fused
def test_a_missing_gradient_falls_back_to_adam_step():
    a, opt_a, b, opt_b = _pair()
    fast = fused_adam_step(opt_b)
    _set_grads(a, 0)
    _set_grads(b, 0)
    a.base.bias.grad = None
    b.base.bias.grad = None
    opt_a.step()
    fast.step()  # Adam.step() skips the parameter without a gradient; so must this
    _assert_same(a, opt_a, b, opt_b)
    assert float(opt_b.state[b.base.bias]["step"]) == 0.0
    assert torch.equal(b.base.bias, a.base.bias)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, fused=False, foreach=False),
        lambda ps: torch.optim.Adam(ps, amsgrad=True, fused=True),
        lambda ps: torch.optim.Adam(ps, maximize=True, fused=True),
        lambda ps: torch.optim.AdamW(ps, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.01), fused=True),
    ],
    ids=["not-fused", "amsgrad", "maximize", "adamw", "sgd", "tensor-lr"],
)
def test_unsupported_optimizers_keep_their_own_step(make):
    params = [nn.Parameter(torch.zeros(3))]
    try:
        optimizer = make(params)
    except (RuntimeError, ValueError, TypeError):
        pytest.skip("this torch build cannot make this optimizer")
    assert fused_adam_step(optimizer) is None
    step, _ = step_function(optimizer)
    assert step == optimizer.step


@needs_fused
def test_an_optimizer_with_a_step_hook_keeps_its_own_step():
    params = [nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.Adam(params, fused=True)
    calls = []
    optimizer.register_step_post_hook(lambda *args: calls.append(1))
    step, _ = step_function(optimizer)
    params[0].grad = torch.ones(3)
    step()
    assert calls == [1]
