"""
================================
The two-dimensional study, small
================================

sknvp started as a reproduction of a student study of Real-NVP on two-dimensional toy data
(two moons, circles, spirals). :mod:`sknvp.study` re-runs that study with what the original
lacked: held-out data, fixed seeds, an equal training budget for every fit, and the true
density's log-likelihood as the ceiling no estimator can beat.

This example runs a small version of it in-process, through the module's public functions
(:func:`~sknvp.study.quick_config`, :func:`~sknvp.study.run_study`,
:func:`~sknvp.study.summarize`), and shows the figures the study writes: fitted densities
across the number of couplings and for fixed, alternating and random masks (the original
report's "fixed masks do not converge"), and the training snapshots in the style of the
original report.

The full study (four data sets, every axis: couplings, depth, width, training samples, noise,
activation and masks, with three seeds) runs from the command line::

    python -m sknvp.study --jobs 2          # python -m sknvp.study --help for the options

and its results are discussed on the :doc:`reproduction <../reproduction>` page.

.. note::
   The documentation build in CI sets ``SKNVP_DOCS_FAST=1``; each fit then gets 150
   optimizer steps instead of 300 and the snapshots stop at epoch 60 instead of 150, so the
   densities are rougher than in a full run of this script, and far rougher than in the
   full study.
"""

# %%
# A small configuration
# ---------------------
# :func:`~sknvp.study.quick_config` is the study's smoke-test configuration; we narrow it to
# three data sets and two axes, one seed.
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from sknvp.study import quick_config, run_study, summarize

FAST = os.environ.get("SKNVP_DOCS_FAST") == "1"
cfg = quick_config(
    sets=("moons", "circles", "spiral2"),
    axes=("couplings", "mask"),
    couplings=(1, 2, 6),
    masks=("fixed", "alternating", "random"),
    steps=150 if FAST else 300,
)
snapshot_cfg = quick_config(
    sets=("moons",),
    axes=("snapshots",),
    snapshot_epochs=(1, 5, 20, 60) if FAST else (1, 10, 50, 150),
)
print(cfg)

# %%
# Run it
# ------
# :func:`~sknvp.study.run_study` prints one line per fit and writes ``results.csv``,
# ``summary.csv`` and the figures to its output folder (a temporary one here).
out = Path(tempfile.mkdtemp(prefix="sknvp_study_"))
rows = run_study(cfg, out, resume=False)
run_study(snapshot_cfg, out / "snapshots", resume=False)

# %%
# Held-out log-likelihood against the ceiling
# -------------------------------------------
# ``kl_gap`` is the ceiling minus the held-out mean log-likelihood: an estimate of the
# Kullback-Leibler divergence from the true density to the model, in nats per point
# (0 is perfect).
summary = pd.DataFrame(summarize(rows))
columns = ["axis", "set", "value", "heldout_ll_mean", "ceiling_mean", "kl_gap_mean",
           "epochs_mean"]
print(summary[columns].round(3).to_string(index=False))


# %%
# The study's figures
# -------------------
# The study saves PNG files; we show them as they are.
def show_png(path, width=11):
    image = plt.imread(path)
    height = width * image.shape[0] / image.shape[1]
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image)
    ax.axis("off")
    plt.show()


# %%
# Fixed, alternating and random masks. With ``mask="fixed"`` the first coordinate is never
# transformed, so the model's density along it stays Gaussian whatever the training
# budget: the original report's observation is a property of the model, not of the
# optimiser (see :ref:`flows`). Random masks, drawn per coupling as the original code did,
# can keep the same half in consecutive couplings.
show_png(out / "grid_mask.png", width=8)

# %%
# The number of couplings. One coupling transforms only the second coordinate given the
# first; stacking couplings with alternating masks is what lets the flow bend the density.
show_png(out / "grid_couplings.png", width=8)
show_png(out / "lines_couplings.png")

# %%
# Training snapshots on two moons, in the style of the original report (which showed
# samples only): the density and samples after a number of epochs.
show_png(out / "snapshots" / "snapshots_moons.png")

# %%
# Clean up the temporary output folder (a real run keeps ``study_out/``).
shutil.rmtree(out)
