"""
===============================================
Out-of-core training from a memory-mapped file
===============================================

When the data do not fit in memory, train with
:meth:`~sknvp.RealNVPDensity.partial_fit`, scikit-learn's out-of-core convention: each call
makes one pass over a chunk of rows and keeps the Adam optimizer state for the next call. Here a
data set is written to a ``.npy`` file on disk, chunk by chunk, so that it never sits in memory
whole; the flow then streams it back through a :func:`numpy.load` memory map, one chunk at a
time, while the process's resident memory (RSS) is recorded after every chunk.

The file is larger than the memory budget we allow the training, yet the peak RSS stays flat:
it is set by one chunk and the training's working set, not by the size of the file.

.. note::
   The page runs a reduced size (800,000 rows, a 390 MB file, a 192 MB budget) so that it
   finishes in under a minute. Run ``python plot_out_of_core.py --full`` (or set
   ``SKNVP_OUT_OF_CORE_FULL=1``) for 8 million rows: a 3.9 GB file under a 384 MB budget
   (about ten minutes on a laptop CPU). Memory is read from ``/proc/self/status`` (Linux),
   else from :mod:`psutil` if it is installed.
"""

# %%
# Data, sizes and the memory budget
# ---------------------------------
# 64 features: 32 independent "banana" pairs, :math:`x_1 \sim \mathcal N(0, 1)` and
# :math:`x_2 = x_1^2/2 + 0.3\,\varepsilon`, with all :math:`x_1` in the first 32 columns. The
# true density is known exactly, which gives a ceiling for the held-out log-likelihood. Wide
# rows make the file large for little compute: a 2-D data set this size on disk would take
# far longer to train on than a gallery page allows.
#
# The budget is what training may add to the process's memory: the chunk in use, its copies
# as tensors and the activations of a minibatch.
import ctypes
import ctypes.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning

from sknvp import RealNVPDensity

FULL = "--full" in sys.argv or os.environ.get("SKNVP_OUT_OF_CORE_FULL") == "1"
N_ROWS = 8_000_000 if FULL else 800_000
CHUNK_ROWS = 100_000 if FULL else 20_000
BUDGET_MB = 384 if FULL else 192
N_PAIRS = 32
MB = 2**20


def make_bananas(n_samples, random_state):
    rng = np.random.RandomState(random_state)
    x1 = rng.normal(size=(n_samples, N_PAIRS))
    return np.hstack([x1, 0.5 * x1**2 + 0.3 * rng.normal(size=(n_samples, N_PAIRS))])


def true_log_density(X):
    x1, x2 = X[:, :N_PAIRS], X[:, N_PAIRS:]
    return (norm.logpdf(x1) + norm.logpdf(x2, 0.5 * x1**2, 0.3)).sum(axis=1)


row_bytes = 2 * N_PAIRS * 8
file_mb = N_ROWS * row_bytes / MB
print(
    f"{N_ROWS:,} rows x {2 * N_PAIRS} features in chunks of {CHUNK_ROWS:,}: "
    f"a {file_mb:.0f} MB file, {CHUNK_ROWS * row_bytes / MB:.0f} MB per chunk, "
    f"budget {BUDGET_MB} MB"
)


# %%
# Measuring memory
# ----------------
# ``VmRSS`` is the resident memory now and ``VmHWM`` its peak (the high-water mark). On
# Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the peak, so the peak below belongs
# to the streaming loop alone and not to whatever this process did before.
#
# glibc's ``malloc`` keeps freed memory for later reuse instead of returning it to the
# system, so RSS overstates what is in use and creeps up by tens of MB over many chunks.
# ``malloc_trim(0)`` after each chunk returns it (setting ``MALLOC_MMAP_THRESHOLD_=65536`` in
# the environment before Python starts also lowers the peak); other C libraries have no such
# call and it is skipped.
def memory_mb():
    """Current and peak resident memory of this process, in MiB."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    except OSError:
        try:
            import psutil
        except ImportError:
            return np.nan, np.nan
        rss = psutil.Process().memory_info().rss / MB
        return rss, rss  # no portable peak: the samples after each chunk stand in for it


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _malloc_trim():
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


release_free_memory = _malloc_trim()


# %%
# Write the data set to disk without holding it
# ---------------------------------------------
# :func:`numpy.lib.format.open_memmap` creates the ``.npy`` file (header and size) without
# touching its pages; each chunk is then generated and written through a short-lived memory
# map. A memory map keeps every page it has touched in the process's RSS (as file-backed
# pages) until it is closed, so the maps here live for one chunk only.
workdir = Path(tempfile.mkdtemp(prefix="sknvp_out_of_core_"))
path = workdir / "bananas.npy"
np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(N_ROWS, 2 * N_PAIRS))

starts = range(0, N_ROWS, CHUNK_ROWS)
tic = time.perf_counter()
for i, start in enumerate(starts):
    stop = min(start + CHUNK_ROWS, N_ROWS)
    out = np.load(path, mmap_mode="r+")
    out[start:stop] = make_bananas(stop - start, random_state=1000 + i)
    out.flush()
    del out
print(f"wrote {path.stat().st_size / MB:.0f} MB in {time.perf_counter() - tic:.1f} s")


def read_chunk(start, stop):
    """Copy rows ``start:stop`` out of the file; the map is closed before returning."""
    rows = np.load(path, mmap_mode="r")
    chunk = np.array(rows[start:stop])
    del rows
    return chunk


# %%
# Stream the file through ``partial_fit``
# ---------------------------------------
# The first call fixes the standardisation from its chunk (so chunks should be shuffled, or
# at least representative) and creates the optimizer; every later call is one pass over its
# chunk at the constant rate ``learning_rate_init``. After each chunk we score 5,000
# held-out rows.
#
# PyTorch's first training step loads kernels and sets up thread pools, a one-time cost of
# roughly 100 MB whatever the data. A throwaway fit on 1,000 rows pays it before the baseline
# is taken, so the curves show what the data stream itself costs.
X_test = make_bananas(5_000, random_state=1)
ceiling = true_log_density(X_test).mean()
with warnings.catch_warnings():  # a one-epoch fit "did not converge": expected, not news
    warnings.simplefilter("ignore", ConvergenceWarning)
    warmup = RealNVPDensity(
        n_couplings=1, hidden_layer_sizes=(8,), max_iter=1, early_stopping=False
    )
    warmup.fit(X_test[:1000])
flow = RealNVPDensity(
    n_couplings=4,
    hidden_layer_sizes=(64, 64),
    batch_size=1024,
    learning_rate_init=2e-3,
    random_state=0,
)

release_free_memory()
reset_peak()
rss0, _ = memory_mb()
rows_seen, rss, peak, scores = [0], [rss0], [rss0], [np.nan]
tic = time.perf_counter()
for start in starts:
    chunk = read_chunk(start, min(start + CHUNK_ROWS, N_ROWS))
    flow.partial_fit(chunk)
    rows_seen.append(rows_seen[-1] + len(chunk))
    del chunk
    scores.append(flow.score(X_test))
    release_free_memory()
    now, high = memory_mb()
    rss.append(now)
    peak.append(high)
seconds = time.perf_counter() - tic
rss, peak = np.array(rss), np.array(peak)
print(f"trained on {rows_seen[-1]:,} rows ({len(starts)} chunks) in {seconds:.1f} s")
print(
    f"RSS before streaming {rss0:.0f} MB; peak during streaming {peak.max():.0f} MB "
    f"(+{peak.max() - rss0:.0f} MB; budget {BUDGET_MB} MB; the file is {file_mb:.0f} MB)"
)
print(
    f"held-out log-likelihood {scores[-1]:+.2f} nats (true density: {ceiling:+.2f}; "
    f"untrained flow: {scores[1]:+.2f} after the first chunk)"
)

# %%
# Peak memory stays flat
# ----------------------
# Left: RSS and its peak after each chunk, against the budget and against what the process
# would need with the whole file in memory (``np.load`` without ``mmap_mode``). The peak is
# reached within the first chunks (a chunk, its copies as tensors, a minibatch's
# activations) and then stays put however many rows have gone by. Right: the held-out
# log-likelihood climbs towards the true density's as chunks stream by.
fig, (ax_mem, ax_ll) = plt.subplots(1, 2, figsize=(11, 4.2))
rows_m = np.array(rows_seen) / 1e6
ax_mem.plot(rows_m, rss, "o-", ms=3, label="RSS after each chunk")
ax_mem.plot(rows_m, peak, "s--", ms=3, label="peak RSS (VmHWM)")
ax_mem.axhline(rss0 + file_mb, color="C3", lw=1.5, label=f"start + whole file ({file_mb:.0f} MB)")
ax_mem.axhline(rss0 + BUDGET_MB, color="0.4", ls=":", label=f"start + budget ({BUDGET_MB} MB)")
ax_mem.set(
    xlabel="rows processed (millions)",
    ylabel="resident memory (MB)",
    title="Memory while streaming from disk",
)
ax_mem.set_ylim(rss0 - 0.1 * file_mb, max(peak.max(), rss0 + file_mb) + 0.25 * file_mb)
ax_mem.legend(loc="upper left", fontsize=8)

ax_ll.plot(np.arange(1, len(scores)), scores[1:], "o-", ms=3, label="partial_fit")
ax_ll.axhline(ceiling, color="k", ls="--", lw=1, label="true density (ceiling)")
ax_ll.set(
    xlabel="chunks seen",
    ylabel="held-out mean log-likelihood (nats)",
    title="Learning from the stream",
)
ax_ll.legend(loc="lower right", fontsize=8)
fig.tight_layout()
plt.show()

# %%
# Clean up the temporary file.
path.unlink()
workdir.rmdir()
