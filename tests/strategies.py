"""Hypothesis strategies shared by the torch-layer tests."""

import torch
from hypothesis import strategies as st

from sknvp.masks import MASK_TYPES
from sknvp.nets import ACTIVATIONS

n_features = st.integers(1, 16)
n_couplings = st.integers(1, 5)
mask_kinds = st.sampled_from(MASK_TYPES)
activations = st.sampled_from(sorted(ACTIVATIONS))
seeds = st.integers(0, 2**31 - 1)


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter and normalisation buffer random values, so no layer is the
    identity (zero-initialised last layers would make the tests trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return module
