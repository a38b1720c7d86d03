"""sknvp._reduce: the mixture reductions that avoid torch's slow CPU paths give torch's numbers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sknvp._reduce import exp_floor, logsumexp, softmax_from, sum_last

DTYPES = [torch.float32, torch.float64]


def _log_terms(dtype):
    # Log-terms of a mixture's rows: spreads of thousands of nats (exp underflows), and
    # infinities.
    finite = st.floats(-5e3, 50, allow_nan=False, width=32 if dtype == torch.float32 else 64)
    return hnp.arrays(
        np.float32 if dtype == torch.float32 else np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
        elements=st.one_of(finite, finite, finite, st.just(-np.inf)),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), keepdim=st.booleans(), dim=st.sampled_from([0, 1]))
def test_logsumexp_is_torchs(dtype, data, keepdim, dim):
    x = torch.from_numpy(data.draw(_log_terms(dtype)))
    want = torch.logsumexp(x, dim, keepdim=keepdim)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = logsumexp(x.clone().requires_grad_(grad), dim, keepdim)
        assert got.shape == want.shape
        torch.testing.assert_close(got.detach(), want, rtol=1e-6 if dtype == torch.float32
                                   else 1e-13, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_of_non_finite_rows_is_torchs(dtype):
    inf = math.inf
    x = torch.tensor(
        [[-inf, -inf], [inf, 0.0], [math.nan, 1.0], [-inf, 3.0], [-2e3, 0.0]], dtype=dtype
    )
    torch.testing.assert_close(logsumexp(x, 1), torch.logsumexp(x, 1), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_gradient_is_the_softmax(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 7, generator=gen, dtype=dtype) * 400).requires_grad_(True)
    logsumexp(x, 1).sum().backward()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), 1), rtol=0, atol=1e-6)
    assert torch.allclose(x.grad.sum(1), torch.ones(50, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_from_matches_exp(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=gen, dtype=dtype) * 300  # most terms underflow
    lse = logsumexp(x, 1, keepdim=True)
    got = softmax_from(x, lse)
    want = torch.exp(x - lse)
    # Where exp underflows the floor stands in: a positive number below exp(floor).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=math.exp(exp_floor(dtype)) * 1.01)
    torch.testing.assert_close(got.sum(1), want.sum(1))  # one, to the rounding of x - lse
    assert bool((got > 0).all())


@pytest.mark.parametrize(
    "shape", [(), (5,), (2,), (3, 1), (4, 2), (7, 3, 2), (7, 3, 3), (6, 5, 64), (2, 3, 0)]
)
def test_sum_last_is_sum_to_the_bit(shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = sum_last(x)
    assert got.shape == x.sum(-1).shape
    assert torch.equal(got, x.sum(-1))
    if x.dim() >= 2 and x.shape[0] > 1:  # the same numbers per row whatever the row count
        assert torch.equal(sum_last(x[:1]), got[:1])
    xg = x.clone().requires_grad_(True)
    sum_last(xg * xg).sum().backward()
    torch.testing.assert_close(xg.grad, 2 * x)


def test_exp_floor_keeps_exp_normal():
    for dtype in DTYPES:
        floor = exp_floor(dtype)
        value = torch.exp(torch.tensor(floor, dtype=dtype))
        assert value >= torch.finfo(dtype).tiny  # a normal number: exp's fast path
        assert floor < math.log(torch.finfo(dtype).eps) - 5  # far below the sum's rounding
