"""Peak memory of RealNVPDensity inference on millions of rows (issue 5).

Each measurement runs in a fresh Python process that loads a pickled model and runs one tiny
call (so imports and lazy initialisation are in the baseline). It then resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``, so the transient peak of importing torch does not
mask what follows; where that is impossible it falls back to ``ru_maxrss``), records the
current RSS as the baseline, builds the input, runs one call on ``n`` rows and reads the peak
RSS. The table reports

    overhead = peak - baseline - input bytes - output bytes

which is what inference costs beyond the arrays the caller holds anyway. Bounded memory means
the overhead stays flat as ``n`` grows (it is one 65536-row chunk of activations). For
contrast, ``--naive`` also measures ``module_.log_prob`` on the whole tensor at once (rows up
to 1e6 only: beyond that it needs gigabytes).

    python benchmarks/bench_memory.py                          # 1e5, 1e6, 1e7 rows
    python benchmarks/bench_memory.py --sizes 100000 --naive   # quick check with the contrast
    python benchmarks/bench_memory.py --json out.json          # also write every number

Numbers depend on the allocator and torch build; rerun on a quiet machine for final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1024.0**2


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") == _status_bytes("VmRSS")


def _peak_bytes(reset: bool) -> int:
    if reset:
        return _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(op: str, n: int, model_path: str, threads: int) -> dict:
    """One measurement; runs in its own process."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    with open(model_path, "rb") as f:
        est = pickle.load(f)
    d = est.n_features_in_
    est.score_samples(np.zeros((10, d)))
    est.sample(10, random_state=0)
    import_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()
    baseline = _status_bytes("VmRSS") if reset else _peak_bytes(False)
    start = time.perf_counter()
    if op == "sample":
        X = None
        out = est.sample(n, random_state=0)
    else:
        X = np.random.RandomState(0).randn(n, d)
        start = time.perf_counter()
        if op == "score_samples":
            out = est.score_samples(X)
        elif op == "naive":
            with torch.inference_mode():
                out = est.module_.log_prob(torch.from_numpy(X)).numpy()
        else:
            raise ValueError(op)
    seconds = time.perf_counter() - start
    peak = _peak_bytes(reset)
    in_bytes = 0 if X is None else X.nbytes
    assert np.all(np.isfinite(out))
    return {
        "op": op,
        "n": n,
        "peak_reset": reset,
        "import_peak_mb": import_peak / MB,
        "baseline_mb": baseline / MB,
        "peak_mb": peak / MB,
        "input_mb": in_bytes / MB,
        "output_mb": out.nbytes / MB,
        "overhead_mb": (peak - baseline - in_bytes - out.nbytes) / MB,
        "seconds": seconds,
        "rows_per_second": n / seconds,
    }


def _fit_model(path: str, threads: int) -> None:
    import numpy as np
    import torch
    from sklearn.datasets import make_moons

    from sknvp import RealNVPDensity

    torch.set_num_threads(threads)
    X, _ = make_moons(2000, noise=0.05, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The defaults (8 couplings of 128x128 conditioners on a Gaussian-mixture base; the
        # size EM picks is printed); training length does not change inference memory.
        est = RealNVPDensity(max_iter=2, random_state=0, device="cpu").fit(X)
    assert np.isfinite(est.score(X))
    print(f"model: {est.n_couplings} couplings of {est.hidden_layer_sizes}, base {est.base!r}"
          f" ({est.n_components_} components)", file=sys.stderr)
    with open(path, "wb") as f:
        pickle.dump(est, f)


def _run_child(op: str, n: int, model: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, __file__, "--child", op, str(n), model, "--threads", str(threads)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{op} n={n} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = [
        "| call | rows | baseline MB | input MB | output MB | peak MB | overhead MB | rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['op']}` | {r['n']:.0e} | {r['baseline_mb']:.0f} | {r['input_mb']:.0f} | "
            f"{r['output_mb']:.0f} | {r['peak_mb']:.0f} | {r['overhead_mb']:.0f} | "
            f"{r['rows_per_second']:.2g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--ops", default="score_samples,sample")
    parser.add_argument("--naive", action="store_true", help="add whole-tensor log_prob")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write all rows to this file")
    parser.add_argument("--child", nargs=3, metavar=("OP", "N", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        op, n, model = args.child
        print(json.dumps(child(op, int(n), model, args.threads)))
        return []
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    ops = args.ops.split(",") + (["naive"] if args.naive else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model.pkl")
        _fit_model(model, args.threads)
        for op in ops:
            for n in sizes:
                if op == "naive" and n > 1_000_000:
                    continue
                rows.append(_run_child(op, n, model, args.threads))
                r = rows[-1]
                print(
                    f"{op:14s} n={n:>9d}  peak {r['peak_mb']:8.1f} MB  overhead "
                    f"{r['overhead_mb']:7.1f} MB  {r['seconds']:6.2f} s",
                    flush=True,
                )
    print()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
