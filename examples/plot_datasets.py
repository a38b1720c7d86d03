"""
=====================================
The toy 2-D data sets of sknvp
=====================================

:mod:`sknvp.datasets` has generators for the four sets of the original Real-NVP study (two
moons, circles and a single spiral arm with one or two turns) and for three sets the flow
literature uses (two interleaved spirals, a checkerboard and eight Gaussians). Each also has an
exact log-density, :func:`sknvp.datasets.true_log_density`.

The top row shows 2,000 samples of each set, the bottom row the exact density on a grid, with
the best possible held-out mean log-likelihood (minus the entropy) in the title.
"""

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sknvp.datasets import DATASETS, true_log_density, true_mean_log_likelihood

PANELS = [  # (title, generator name, parameters)
    ("two moons", "moons", {"noise": 0.05}),
    ("circles (factor 0.8)", "circles", {"noise": 0.05}),
    ("spiral, 1 turn", "spiral", {"noise": 1.0, "turns": 1}),
    ("spiral, 2 turns", "spiral", {"noise": 1.0, "turns": 2}),
    ("two spirals", "two_spirals", {"noise": 0.1}),
    ("checkerboard", "checkerboard", {"noise": 0.0}),
    ("eight Gaussians", "eight_gaussians", {"noise": 0.2}),
]


def density_image(name, params, X, n=160):
    """Exact density on an n x n grid around the samples ``X``."""
    pad = 0.1 * np.ptp(X, axis=0)
    lo, hi = X.min(0) - pad, X.max(0) + pad
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    params = dict(params)
    noise = params.pop("noise")
    density = np.exp(true_log_density(name, grid, noise=noise, **params)).reshape(n, n)
    return density, (lo[0], hi[0], lo[1], hi[1])


fig, axes = plt.subplots(2, len(PANELS), figsize=(2.6 * len(PANELS), 5.6))
for col, (title, name, params) in enumerate(PANELS):
    X = DATASETS[name](2000, random_state=0, **params)
    density, extent = density_image(name, params, X)
    ceiling, _ = true_mean_log_likelihood(name, n_samples=20_000, **params)
    axes[0, col].scatter(X[:, 0], X[:, 1], s=1.5, alpha=0.5, color="k", linewidths=0)
    axes[0, col].set_title(f"{title}\nnoise={params['noise']}", fontsize=9)
    axes[1, col].imshow(density, origin="lower", extent=extent, cmap="viridis", aspect="auto")
    axes[1, col].set_title(f"exact density\nceiling {ceiling:+.2f} nats", fontsize=9)
    for ax in axes[:, col]:
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="box")
fig.tight_layout()

# ``python examples/plot_datasets.py --save`` also writes the figure that docs/datasets.md shows.
if "--save" in sys.argv:
    out = Path("docs") / "figures" / "datasets"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "datasets.png", dpi=110)
    print(f"wrote {out / 'datasets.png'}")
