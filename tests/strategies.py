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


def random_mixture(n_components: int, n_features: int, seed: int):
    """A :class:`~sknvp.mixture.GaussianMixtureBase` with random weights, means and
    precision factors (float64)."""
    from sknvp.mixture import GaussianMixtureBase

    gen = torch.Generator().manual_seed(seed)
    k, d = n_components, n_features
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    means = 2.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    upper = 0.5 * torch.randn(k, d, d, generator=gen, dtype=torch.float64)
    diag = torch.rand(k, d, generator=gen, dtype=torch.float64) + 0.5
    return GaussianMixtureBase(weights, means, torch.triu(upper, 1) + torch.diag_embed(diag))


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
