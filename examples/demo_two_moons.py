"""The README demo: fit two moons, print the held-out log-likelihood, write a density PNG.

Run ``python examples/demo_two_moons.py [--out two_moons.png]``. Takes well under a minute on
two CPU cores.
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sknvp import RealNVPDensity  # noqa: E402
from sknvp.datasets import make_moons, true_log_density  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="two_moons.png", help="where to write the figure")
    parser.add_argument("--n-samples", type=int, default=5000)
    args = parser.parse_args()

    X = make_moons(args.n_samples, noise=0.05, random_state=0)
    X_test = make_moons(10_000, noise=0.05, random_state=1)
    start = time.perf_counter()
    est = RealNVPDensity(random_state=0).fit(X)
    seconds = time.perf_counter() - start
    ceiling = true_log_density("moons", X_test, noise=0.05).mean()
    print(f"fitted in {seconds:.1f} s, {est.n_iter_} epochs")
    print(f"held-out mean log-likelihood: {est.score(X_test):.3f} nats "
          f"(true density: {ceiling:.3f})")

    xx, yy = np.meshgrid(np.linspace(-1.5, 2.5, 300), np.linspace(-1.0, 1.5, 200))
    density = np.exp(est.score_samples(np.c_[xx.ravel(), yy.ravel()])).reshape(xx.shape)
    samples = est.sample(2000, random_state=0)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True, sharey=True)
    axes[0].scatter(*X[:2000].T, s=2, alpha=0.5)
    axes[0].set_title("training data")
    mesh = axes[1].pcolormesh(xx, yy, density, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=axes[1], label="density")
    axes[1].set_title(f"fitted density (held-out LL {est.score(X_test):.2f})")
    axes[2].scatter(*samples.T, s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("samples from the flow")
    for ax in axes:
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
