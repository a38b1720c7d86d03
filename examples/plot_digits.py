"""
Handwritten digits with the multi-scale Real NVP
================================================

:class:`~sknvp.RealNVPImageDensity` is the image architecture of the Real NVP paper
(Dinh et al., 2016): affine couplings with checkerboard and channel masks, squeezes that trade
space for channels, and half of the channels sent to the Gaussian latent at each scale. Here
it learns the density of scikit-learn's 8x8 digits, whose pixels take 17 levels (0 to 16).

The estimator takes rows of 64 pixels, as :func:`~sklearn.datasets.load_digits` gives them,
adds uniform noise to the integer levels during training (dequantisation) and applies the
paper's logit transform inside the flow, so :meth:`score_samples` is the log-density of the
pixels themselves. :meth:`bits_per_dim` turns it into the usual figure: a model that spreads
its mass evenly over the 17 levels scores :math:`\\log_2 17 = 4.09` bits per pixel.

Set the environment variable ``SKNVP_EXAMPLE_FAST=1`` for a run of well under a minute (a
smaller network and 3 epochs); ``benchmarks/bench_images.py`` trains the full model and
compares it with other estimators.
"""

# %%
# Data: a fixed split of the 1,797 digits
# ---------------------------------------
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from sknvp import RealNVPImageDensity

FAST = os.environ.get("SKNVP_EXAMPLE_FAST", "") not in ("", "0")
if FAST:
    # Small convolutions gain nothing from several threads, and lose a lot when other
    # programs share the cores.
    torch.set_num_threads(1)

X = load_digits().data  # shape (1797, 64), integer levels 0..16
X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)

# %%
# Fit the multi-scale flow
# ------------------------
# ``image_shape`` is inferred: 64 pixels make one-channel 8x8 images, which get two scales
# (8x8, then 4x4 with 4 channels). Training stops early when the log-likelihood of a
# held-out tenth of the training images stops improving.
est = RealNVPImageDensity(
    n_levels=17,
    n_blocks=1 if FAST else 2,
    n_channels=16 if FAST else 32,
    max_iter=3 if FAST else 20,
    random_state=0,
    verbose=1,
)
est.fit(X_train)
bpd = est.bits_per_dim(X_test, n_draws=5, random_state=0)
print(f"image shape {est.image_shape_}, {est.n_scales_} scales, {est.n_iter_} epochs")
print(f"held-out: {bpd:.3f} bits/dim (uniform over 17 levels: {math.log2(17):.3f})")

# %%
# Real digits, samples, and the training curve
# --------------------------------------------
# Samples at temperature 0.7 (a narrower latent normal) are smoother and more typical than
# those at temperature 1. They are continuous values; ``np.floor`` would give integer levels.


def tile(images, cols=6):
    """Arrange 8x8 images in a grid with one-pixel gaps."""
    images = np.clip(images, 0, 16).reshape(-1, 8, 8)
    rows = math.ceil(len(images) / cols)
    canvas = np.zeros((rows * 9 + 1, cols * 9 + 1))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = img
    return canvas


panels = {
    "held-out digits": X_test[:36],
    "samples, temperature 1": est.sample(36, random_state=0),
    "samples, temperature 0.7": est.sample(36, random_state=0, temperature=0.7),
}
fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})
for ax, (title, images) in zip(axes[:3], panels.items(), strict=True):
    ax.imshow(tile(images), cmap="gray_r", vmin=0, vmax=16)
    ax.set_title(title)
    ax.axis("off")

to_bits = 1 / (64 * math.log(2))  # nats per image -> bits per pixel
epochs = np.arange(1, est.n_iter_ + 1)
axes[3].plot(epochs, np.array(est.loss_curve_) * to_bits, "o-", label="training")
axes[3].plot(epochs, -np.array(est.validation_scores_) * to_bits, "o-", label="validation")
axes[3].set_xlabel("epoch")
axes[3].set_ylabel("bits / dim")
axes[3].set_title(f"training curve (test: {bpd:.2f} bits/dim)")
axes[3].legend()
fig.tight_layout()

out = os.environ.get("SKNVP_EXAMPLE_OUT")
if out:
    fig.savefig(os.path.join(out, "digits_example.png"), dpi=110)
plt.show()
