"""Reproduce the original 2-D Real-NVP study: ``python -m sknvp.study``.

The study fits :class:`~sknvp.RealNVPDensity` to the four data sets of the original report
(two moons, circles, and one spiral arm with one or two turns, "spiral2" and "spiral4") and
varies one thing at a time around a baseline: the number of couplings, the depth and width of
each coupling's network, the number of training samples, the noise in the data, the activation
and the masks. Every setting is run with several seeds and scored by the mean log-likelihood on a
fresh, larger held-out draw, next to the exact ceiling of :mod:`sknvp.datasets`.

Outputs in ``--out`` (default ``study_out/``): ``results.csv`` and ``results.json`` (one row per
axis point and seed), ``summary.csv`` (mean and spread over seeds) and PNG figures (training
snapshots per set, a density grid and a line plot per axis). Everything goes through the public
estimator API. The training budget is an explicit number of optimizer steps per fit
(``--steps``); the command prints a time estimate measured on the machine it runs on.

Examples
--------
>>> from sknvp.study import StudyConfig, quick_config
>>> cfg = quick_config(sets=("moons",), axes=("couplings",))
>>> cfg.axis_values("couplings", "moons")
(1, 2, 6)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .datasets import DATASETS, true_log_density

__all__ = [
    "AXES",
    "STUDY_SETS",
    "StudyConfig",
    "estimate_seconds",
    "full_config",
    "main",
    "plan_fits",
    "quick_config",
    "run_study",
    "summarize",
]


@dataclass(frozen=True)
class SetSpec:
    """A data set of the study: generator name, fixed parameters, baseline and noise levels."""

    generator: str
    params: dict
    noise: float
    noise_levels: tuple

    def draw(self, n: int, noise: float, seed: int) -> np.ndarray:
        return DATASETS[self.generator](n, noise=noise, random_state=seed, **self.params)

    def log_density(self, X: np.ndarray, noise: float) -> np.ndarray:
        return true_log_density(self.generator, X, noise=noise, **self.params)


STUDY_SETS: dict[str, SetSpec] = {
    "moons": SetSpec("moons", {}, 0.05, (0.01, 0.05, 0.1, 0.2)),
    "circles": SetSpec("circles", {"factor": 0.8}, 0.05, (0.01, 0.05, 0.1, 0.2)),
    "spiral2": SetSpec("spiral", {"turns": 1}, 1.0, (0.5, 1.0, 2.0, 4.0)),
    "spiral4": SetSpec("spiral", {"turns": 2}, 1.0, (0.5, 1.0, 2.0, 4.0)),
    "two_spirals": SetSpec("two_spirals", {}, 0.1, (0.05, 0.1, 0.2, 0.4)),
    "checkerboard": SetSpec("checkerboard", {}, 0.0, (0.0, 0.1, 0.2, 0.4)),
    "eight_gaussians": SetSpec("eight_gaussians", {}, 0.2, (0.1, 0.2, 0.4, 0.8)),
}
"""Data sets by study name; the first four are the original study's."""

AXES = ("couplings", "depth", "width", "samples", "noise", "activation", "mask",
        "samples_couplings", "depth_2_couplings")
"""The varied parameters, in the order of the original report's claims."""

_AXIS_LABELS = {
    "couplings": "number of couplings", "depth": "hidden layers per coupling",
    "width": "hidden units per layer", "samples": "training samples", "noise": "noise std",
    "activation": "activation", "mask": "mask", "samples_couplings": "training samples",
    "depth_2_couplings": "hidden layers per coupling (2 couplings)",
}


@dataclass(frozen=True)
class StudyConfig:
    """Everything one run of the study depends on; the defaults are the full study.

    The baseline model is ``n_couplings``, ``depth`` hidden layers of ``width`` units, relu,
    alternating masks, trained on ``n_train`` samples at each set's baseline noise. Each axis
    changes one of these. Every fit gets the same budget of ``steps`` optimizer steps (Adam,
    cosine schedule, ``batch_size`` rows per step) and stops earlier when the validation score
    has not improved for ``patience_steps`` steps.
    """

    sets: tuple = ("moons", "circles", "spiral2", "spiral4")
    axes: tuple = AXES + ("snapshots",)
    seeds: int = 3
    n_train: int = 2000
    n_test: int = 20_000
    steps: int = 1500
    patience_steps: int = 400
    batch_size: int = 512
    learning_rate_init: float = 3e-3
    n_couplings: int = 6
    depth: int = 2
    width: int = 64
    couplings: tuple = (1, 2, 3, 4, 6, 8)
    depths: tuple = (1, 2, 3, 4, 5, 6)
    widths: tuple = (16, 64, 256)
    samples: tuple = (500, 2000, 10_000, 50_000)
    activations: tuple = ("relu", "leaky_relu", "tanh", "elu")
    masks: tuple = ("fixed", "alternating", "checkerboard", "random")
    cross_sets: tuple = ("moons",)
    cross_couplings: tuple = (2, 4, 6)
    few_couplings_depths: tuple = (1, 2, 4, 6)
    noise_levels: int = 4
    snapshot_epochs: tuple = (1, 3, 10, 30, 100, 300, 1000)
    snapshot_learning_rate: float = 1e-3
    grid_size: int = 100
    device: str = "cpu"
    threads: int = 1
    extra: dict = field(default_factory=dict)

    def axis_values(self, axis: str, set_name: str) -> tuple:
        """The values an axis takes on a set."""
        if axis == "noise":
            return STUDY_SETS[set_name].noise_levels[: self.noise_levels]
        if axis == "samples_couplings":
            if set_name not in self.cross_sets:
                return ()
            return tuple((n, k) for k in self.cross_couplings for n in self.samples)
        return {"couplings": self.couplings, "depth": self.depths, "width": self.widths,
                "samples": self.samples, "activation": self.activations,
                "mask": self.masks, "depth_2_couplings": self.few_couplings_depths}[axis]


def full_config(**changes) -> StudyConfig:
    """The full study (354 fits; see :func:`estimate_seconds`)."""
    return replace(StudyConfig(), **changes)


def quick_config(**changes) -> StudyConfig:
    """A small version for smoke runs: fewer settings, smaller data, 1 seed, 300 steps."""
    quick = dict(
        seeds=1, n_train=1000, n_test=4000, steps=300, patience_steps=150,
        couplings=(1, 2, 6), depths=(1, 3), widths=(), samples=(500, 2000),
        activations=("relu", "tanh"), masks=("fixed", "alternating"), noise_levels=2,
        cross_couplings=(), few_couplings_depths=(), snapshot_epochs=(1, 10, 50, 150), grid_size=60,
    )
    return replace(StudyConfig(), **{**quick, **changes})


# ------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Fit:
    """One model fit: a set, a data draw and a model configuration."""

    set_name: str
    n_train: int
    noise: float
    n_couplings: int
    hidden: tuple
    activation: str
    mask: str
    seed: int


def _axis_fit(cfg: StudyConfig, set_name: str, axis: str, value, seed: int) -> Fit:
    base = dict(
        set_name=set_name, n_train=cfg.n_train, noise=STUDY_SETS[set_name].noise,
        n_couplings=cfg.n_couplings, hidden=(cfg.width,) * cfg.depth, activation="relu",
        mask="alternating", seed=seed,
    )
    change = {
        "couplings": lambda v: {"n_couplings": v},
        "depth": lambda v: {"hidden": (cfg.width,) * v},
        "width": lambda v: {"hidden": (v,) * cfg.depth},
        "samples": lambda v: {"n_train": v},
        "noise": lambda v: {"noise": v},
        "activation": lambda v: {"activation": v},
        "mask": lambda v: {"mask": v},
        "samples_couplings": lambda v: {"n_train": v[0], "n_couplings": v[1]},
        "depth_2_couplings": lambda v: {"n_couplings": 2, "hidden": (cfg.width,) * v},
    }[axis](value)
    return Fit(**{**base, **change})


def plan_fits(cfg: StudyConfig) -> list[tuple[str, str, object, Fit]]:
    """Every (axis, set, value, fit) of the study; identical fits appear under several axes."""
    plan = []
    for set_name in cfg.sets:
        for axis in (a for a in cfg.axes if a in AXES):
            for value in cfg.axis_values(axis, set_name):
                for seed in range(cfg.seeds):
                    plan.append((axis, set_name, value, _axis_fit(cfg, set_name, axis, value, seed)))
    return plan


def _steps_per_epoch(cfg: StudyConfig, n_train: int) -> int:
    """Optimizer steps per epoch (10 % of the rows are held out for early stopping)."""
    n_fit = n_train - max(1, math.ceil(0.1 * n_train))
    steps, tail = divmod(n_fit, min(cfg.batch_size, n_fit))
    return steps + (tail >= 2)


def _estimator(cfg: StudyConfig, fit: Fit, **overrides):
    from . import RealNVPDensity

    per_epoch = _steps_per_epoch(cfg, fit.n_train)
    params = dict(
        n_couplings=fit.n_couplings, hidden_layer_sizes=fit.hidden, activation=fit.activation,
        mask=fit.mask, max_iter=max(1, round(cfg.steps / per_epoch)),
        batch_size=cfg.batch_size, learning_rate_init=cfg.learning_rate_init,
        n_iter_no_change=max(5, math.ceil(cfg.patience_steps / per_epoch)),
        random_state=fit.seed, device=cfg.device,
        base="normal",  # the study's flows, as the paper's, map to a standard normal
        alpha=0.0,  # and train without weight decay, as the study did
        couplings_cv=None,  # its early stopping had only the validation split
    )
    return RealNVPDensity(**{**params, **overrides})


@contextlib.contextmanager
def _torch_threads(n: int | None):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------- fitting


def _extent(X: np.ndarray) -> tuple:
    lo, hi = np.percentile(X, 0.2, axis=0), np.percentile(X, 99.8, axis=0)
    pad = 0.12 * (hi - lo)
    return (lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1])


def _grid(extent: tuple, n: int) -> np.ndarray:
    xs, ys = np.linspace(*extent[:2], n), np.linspace(*extent[2:], n)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def _test_data(cfg: StudyConfig, set_name: str, noise: float) -> dict:
    spec = STUDY_SETS[set_name]
    X = spec.draw(cfg.n_test, noise, seed=10_000_019)
    shape = spec.draw(20_000, 0.0, seed=7)  # noise-free support, for the spread measure
    extent = _extent(X)
    true_grid = spec.log_density(_grid(extent, cfg.grid_size), noise) if noise > 0 else None
    return {"X": X, "log_p": spec.log_density(X, noise), "shape": shape, "extent": extent,
            "true_grid": true_grid}


def _spread(points: np.ndarray, shape: np.ndarray) -> float:
    """Root-mean-square distance from ``points`` to the nearest noise-free point."""
    from scipy.spatial import cKDTree

    return float(np.sqrt(np.mean(cKDTree(shape).query(points)[0] ** 2)))


def _epochs_to_converge(scores: list, tol: float = 0.05) -> int:
    """First epoch whose validation score is within ``tol`` nats of the best one."""
    scores = np.asarray(scores, dtype=float)
    if not len(scores) or not np.isfinite(scores).any():
        return 0
    return int(np.argmax(scores >= np.nanmax(scores) - tol)) + 1


def _score(est, test: dict, fit: Fit) -> dict:
    log_q = est.score_samples(test["X"])
    gap = test["log_p"] - log_q
    finite = np.isfinite(test["log_p"])
    samples = est.sample(5000, random_state=fit.seed)
    data_spread = _spread(test["X"][:5000], test["shape"])
    return {
        "heldout_ll": float(np.mean(log_q)),
        "ceiling": float(np.mean(test["log_p"])),
        "kl_gap": float(np.mean(gap[finite])),
        "median_gap": float(np.median(gap[finite])),
        "tail_fail_frac": float(np.mean(gap[finite] > 5.0)),
        "worst_ll": float(np.min(log_q)),
        "spread_ratio": _spread(samples, test["shape"]) / data_spread if data_spread else np.nan,
    }


def _mask_pattern(est) -> str:
    """Which feature each coupling keeps fixed, e.g. ``"0101"`` (read from ``module_``)."""
    from .transforms import AffineCoupling

    kept = [int(np.flatnonzero(m.mask.cpu().numpy())[0]) if m.mask.any() else -1
            for m in est.module_.modules() if isinstance(m, AffineCoupling)]
    return "".join(str(k) for k in kept)


def _run_fit(cfg: StudyConfig, fit: Fit, test: dict, want_grid: bool) -> dict:
    spec = STUDY_SETS[fit.set_name]
    X = spec.draw(fit.n_train, fit.noise, seed=1000 + fit.seed)
    est = _estimator(cfg, fit)
    with _torch_threads(cfg.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        est.fit(X)
        seconds = time.perf_counter() - start
        row = {
            **asdict(fit), "hidden": "x".join(map(str, fit.hidden)),
            "fit_seconds": seconds, "epochs": est.n_iter_, "max_iter": est.max_iter,
            "steps_per_epoch": _steps_per_epoch(cfg, fit.n_train),
            "seconds_per_epoch": seconds / max(est.n_iter_, 1),
            "epochs_to_converge": _epochs_to_converge(est.validation_scores_),
            "early_stopped": bool(est.converged_), "mask_pattern": _mask_pattern(est),
            **_score(est, test, fit),
        }
        if want_grid:
            grid = est.score_samples(_grid(test["extent"], cfg.grid_size))
            row["_grid"] = grid.reshape(cfg.grid_size, cfg.grid_size).astype(np.float32)
    row["steps_to_converge"] = row["epochs_to_converge"] * row["steps_per_epoch"]
    return row


def _run_snapshots(cfg: StudyConfig, set_name: str, test: dict) -> dict:
    """Warm-started fits with a constant learning rate, stopped at each snapshot epoch."""
    spec = STUDY_SETS[set_name]
    fit = _axis_fit(cfg, set_name, "couplings", cfg.n_couplings, 0)
    X = spec.draw(cfg.n_train, spec.noise, seed=1000)
    est = _estimator(cfg, fit, warm_start=True, learning_rate="constant", early_stopping=False,
                     learning_rate_init=cfg.snapshot_learning_rate)
    grid, frames, done = _grid(test["extent"], cfg.grid_size), [], 0
    with _torch_threads(cfg.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in cfg.snapshot_epochs:
            est.set_params(max_iter=epoch - done).fit(X)
            done = est.n_iter_
            frames.append({
                "epoch": done, "heldout_ll": float(est.score(test["X"])),
                "grid": est.score_samples(grid).reshape(cfg.grid_size, -1),
                "samples": est.sample(2000, random_state=0),
            })
    return {"set": set_name, "data": X, "frames": frames}


# ------------------------------------------------------------------------ orchestration


def _unique_fits(plan) -> list[Fit]:
    seen = {}
    for *_, fit in plan:
        seen.setdefault(fit, None)
    return list(seen)


def _test_sets(cfg: StudyConfig, fits, cache=None) -> dict:
    keys = {(f.set_name, f.noise) for f in fits}
    keys |= {(s, STUDY_SETS[s].noise) for s in cfg.sets}
    tests = {}
    for key in sorted(keys):
        tests[key] = cache.load_test(key) if cache is not None else None
        if tests[key] is None:
            tests[key] = _test_data(cfg, *key)
            if cache is not None:
                cache.save_test(key, tests[key])
    return tests


def _step_seconds(cfg: StudyConfig, fit: Fit) -> float:
    """Measured seconds per optimizer step of this architecture (a 24-step fit)."""
    from . import RealNVPDensity

    X = np.random.RandomState(0).standard_normal((cfg.batch_size * 6, 2))
    est = RealNVPDensity(
        n_couplings=fit.n_couplings, hidden_layer_sizes=fit.hidden, activation=fit.activation,
        max_iter=4, batch_size=cfg.batch_size, early_stopping=False, random_state=0,
        device=cfg.device, base="normal", alpha=0.0,
    )
    with _torch_threads(cfg.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        est.fit(X)
    return (time.perf_counter() - start) / (4 * 6)


def estimate_seconds(cfg: StudyConfig, jobs: int = 1) -> float:
    """Upper-bound wall time of the study on this machine: every fit runs its full step budget
    at the measured per-step cost of its architecture (early stopping usually ends sooner)."""
    fits = _unique_fits(plan_fits(cfg))
    arch = {}
    total = 0.0
    for fit in fits:
        key = (fit.n_couplings, fit.hidden, fit.activation)
        if key not in arch:
            arch[key] = _step_seconds(cfg, fit)
        per_epoch = _steps_per_epoch(cfg, fit.n_train)
        steps = max(1, round(cfg.steps / per_epoch)) * per_epoch
        total += steps * arch[key]
    if "snapshots" in cfg.axes:
        base = _axis_fit(cfg, cfg.sets[0], "couplings", cfg.n_couplings, 0)
        per_epoch = _steps_per_epoch(cfg, cfg.n_train)
        total += len(cfg.sets) * cfg.snapshot_epochs[-1] * per_epoch * arch.get(
            (base.n_couplings, base.hidden, base.activation), 0.01)
    return total / max(1, jobs) * 1.1


def _parallel(function, tasks, jobs: int):
    if jobs == 1:
        return (function(*task) for task in tasks)
    from joblib import Parallel, delayed

    run = Parallel(n_jobs=jobs, return_as="generator_unordered")
    return run(delayed(function)(*task) for task in tasks)


def _fit_task(cfg, fit, test, want_grid):
    return fit, _run_fit(cfg, fit, test, want_grid)


def run_study(
    cfg: StudyConfig, out, *, jobs: int = 1, log=print, resume: bool = True,
    report_only: bool = False,
) -> list[dict]:
    """Run the study and write results and figures to ``out``; return the result rows.

    Each finished fit is cached in ``out/cache/``, so an interrupted run continues where it
    stopped when called again with the same configuration (``resume=True``), and the tables
    and figures are rebuilt from everything cached.

    Parameters
    ----------
    cfg : StudyConfig
        What to run (see :func:`full_config` and :func:`quick_config`).
    out : str or Path
        Output folder (created).
    jobs : int, default=1
        Number of joblib worker processes.
    log : callable, default=print
        Receives one progress line per fit.
    resume : bool, default=True
        Reuse fits cached by an earlier run with the same budget; False refits everything.
    report_only : bool, default=False
        Fit nothing: write tables and figures from the cached fits only (for a partial run).

    Returns
    -------
    rows : list of dict
        One row per (axis, set, value, seed), as written to ``results.csv``.
    """
    out = Path(out)
    cache = _Cache(out / "cache", cfg, enabled=resume)
    plan = plan_fits(cfg)
    fits = sorted(_unique_fits(plan), key=lambda f: f.seed)  # all settings once, then again
    tests = _test_sets(cfg, fits, cache)
    start = time.perf_counter()
    results = {f: cache.load_fit(f) for f in fits}
    missing = [f for f in fits if results[f] is None]
    todo = [] if report_only else missing
    log(f"{len(fits) - len(missing)} of {len(fits)} fits cached in {cache.root}; "
        f"running {len(todo)}")
    tasks = [(cfg, f, tests[(f.set_name, f.noise)], f.seed == 0) for f in todo]
    for i, (fit, row) in enumerate(_parallel(_fit_task, tasks, jobs), 1):
        results[fit] = cache.save_fit(fit, row)
        log(_progress_line(i, len(todo), row, time.perf_counter() - start))
    snapshots = []
    if "snapshots" in cfg.axes:
        snapshots = [cache.load_snapshots(s) for s in cfg.sets]
        tasks = [(cfg, s, tests[(s, STUDY_SETS[s].noise)])
                 for s, snap in zip(cfg.sets, snapshots, strict=True) if snap is None]
        snapshots = [snap for snap in snapshots if snap is not None]
        for snap in _parallel(_run_snapshots, [] if report_only else tasks, jobs):
            snapshots.append(cache.save_snapshots(snap))
            log(f"snapshots of {snap['set']} done ({time.perf_counter() - start:.0f} s)")
    rows = _rows(plan, results)
    _write_tables(out, cfg, rows, time.perf_counter() - start)
    _write_figures(out, cfg, rows, results, tests, snapshots)
    log(f"study finished in {time.perf_counter() - start:.0f} s; results in {out}")
    return rows


class _Cache:
    """Finished fits and snapshot runs on disk, keyed by everything that determines them."""

    _BUDGET = ("steps", "patience_steps", "batch_size", "learning_rate_init", "n_test",
               "grid_size", "device")
    _SNAPSHOT = ("snapshot_epochs", "snapshot_learning_rate", "n_train", "n_couplings",
                 "depth", "width")

    def __init__(self, root: Path, cfg: StudyConfig, enabled: bool = True) -> None:
        self.root, self.enabled = root, enabled
        self.budget = {k: getattr(cfg, k) for k in self._BUDGET}
        self.snapshot = {k: getattr(cfg, k) for k in self._SNAPSHOT}
        root.mkdir(parents=True, exist_ok=True)

    def _key(self, what, *extra) -> str:
        import hashlib

        text = json.dumps([what, self.budget, *extra], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def load_fit(self, fit: Fit) -> dict | None:
        path = self.root / f"fit_{self._key(asdict(fit))}.json"
        if not (self.enabled and path.exists()):
            return None
        row = json.loads(path.read_text())
        if path.with_suffix(".npy").exists():
            row["_grid"] = np.load(path.with_suffix(".npy"))
        return row

    def save_fit(self, fit: Fit, row: dict) -> dict:
        path = self.root / f"fit_{self._key(asdict(fit))}.json"
        if "_grid" in row:
            np.save(path.with_suffix(".npy"), row["_grid"])
        public = {k: v for k, v in row.items() if not k.startswith("_")}
        path.write_text(json.dumps(public, default=float))
        return row

    def _test_path(self, key: tuple) -> Path:
        return self.root / f"test_{key[0]}_{self._key(list(key))}.npz"

    def load_test(self, key: tuple) -> dict | None:
        path = self._test_path(key)
        if not path.exists():  # test sets are deterministic: always reusable
            return None
        z = np.load(path)
        test = {k: z[k] for k in ("X", "log_p", "shape")}
        test["extent"] = tuple(float(v) for v in z["extent"])
        test["true_grid"] = z["true_grid"] if z["true_grid"].size else None
        return test

    def save_test(self, key: tuple, test: dict) -> None:
        grid = test["true_grid"] if test["true_grid"] is not None else np.empty(0)
        np.savez(self._test_path(key), X=test["X"], log_p=test["log_p"], shape=test["shape"],
                 extent=np.array(test["extent"]), true_grid=grid)

    def _snap_path(self, set_name: str) -> Path:
        return self.root / f"snapshots_{set_name}_{self._key(set_name, self.snapshot)}.npz"

    def load_snapshots(self, set_name: str) -> dict | None:
        path = self._snap_path(set_name)
        if not (self.enabled and path.exists()):
            return None
        z = np.load(path)
        frames = [{"epoch": int(e), "heldout_ll": float(ll), "grid": g, "samples": x}
                  for e, ll, g, x in zip(z["epoch"], z["heldout_ll"], z["grid"], z["samples"], strict=True)]
        return {"set": set_name, "data": z["data"], "frames": frames}

    def save_snapshots(self, snap: dict) -> dict:
        frames = snap["frames"]
        np.savez(self._snap_path(snap["set"]), data=snap["data"],
                 **{k: np.array([f[k] for f in frames]) for k in frames[0]})
        return snap


def _progress_line(i: int, n: int, row: dict, elapsed: float) -> str:
    what = (f"K={row['n_couplings']} hidden={row['hidden']} {row['activation']} {row['mask']} "
            f"n={row['n_train']} noise={row['noise']:g} seed={row['seed']}")
    return (f"[{i}/{n}] {row['set_name']:8s} {what}: held-out {row['heldout_ll']:+.3f} "
            f"(ceiling {row['ceiling']:+.3f}), {row['epochs']} epochs, "
            f"{row['fit_seconds']:.1f} s  [{elapsed:.0f} s]")


def _value_str(value) -> str:
    return f"{value[0]}/{value[1]}" if isinstance(value, tuple) else f"{value:g}" if isinstance(
        value, float) else str(value)


def _rows(plan, results) -> list[dict]:
    rows = []
    for axis, set_name, value, fit in plan:
        if results.get(fit) is None:
            continue
        result = {k: v for k, v in results[fit].items() if not k.startswith("_")}
        rows.append({"axis": axis, "set": set_name, "value": _value_str(value), **result})
    return rows


_SUMMARY_COLUMNS = ("heldout_ll", "ceiling", "kl_gap", "median_gap", "tail_fail_frac",
                    "spread_ratio", "fit_seconds", "seconds_per_epoch", "epochs",
                    "epochs_to_converge", "steps_to_converge")


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (axis, set, value), in plan order."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["axis"], row["set"], row["value"]), []).append(row)
    summary = []
    for (axis, set_name, value), members in groups.items():
        entry = {"axis": axis, "set": set_name, "value": value, "n_seeds": len(members)}
        for col in _SUMMARY_COLUMNS:
            vals = np.array([m[col] for m in members], dtype=float)
            entry[f"{col}_mean"] = float(np.mean(vals))
            entry[f"{col}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        summary.append(entry)
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _write_tables(out: Path, cfg: StudyConfig, rows: list[dict], seconds: float) -> None:
    summary = summarize(rows)
    _write_csv(out / "results.csv", rows)
    _write_csv(out / "summary.csv", summary)
    meta = {"config": asdict(cfg), "seconds": seconds, "rows": rows, "summary": summary,
            "sets": {s: asdict(STUDY_SETS[s]) for s in cfg.sets}}
    with open(out / "results.json", "w") as fh:
        json.dump(meta, fh, indent=1, default=str)


# ------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _density_image(ax, log_grid, extent, vmax) -> None:
    ax.imshow(np.exp(log_grid), origin="lower", extent=extent, cmap="viridis", vmin=0,
              vmax=vmax, aspect="equal", interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])


def _vmax(test: dict) -> float:
    if test["true_grid"] is None:  # noise-free checkerboard: 1/32 on the squares
        return float(np.exp(np.max(test["log_p"])))
    return float(np.exp(np.max(test["true_grid"])))


def _snapshot_figure(out: Path, cfg: StudyConfig, snap: dict, test: dict) -> None:
    plt = _plt()
    frames = snap["frames"]
    vmax, extent = _vmax(test), test["extent"]
    aspect = min(1.2, (extent[3] - extent[2]) / (extent[1] - extent[0]))
    fig, axes = plt.subplots(2, len(frames) + 1, squeeze=False, layout="constrained",
                             figsize=(2.1 * (len(frames) + 1), 2 * 2.1 * aspect + 1.6))
    true_grid = test["true_grid"]
    if true_grid is not None:
        _density_image(axes[0, 0], true_grid.reshape(cfg.grid_size, -1), extent, vmax)
    axes[0, 0].set_title(f"true density\nceiling {np.mean(test['log_p']):+.2f}", fontsize=9)
    _scatter(axes[1, 0], snap["data"], extent, "training data", "k")
    for col, frame in enumerate(frames, 1):
        _density_image(axes[0, col], frame["grid"], extent, vmax)
        axes[0, col].set_title(f"epoch {frame['epoch']}\nheld-out {frame['heldout_ll']:+.2f}",
                               fontsize=9)
        _scatter(axes[1, col], frame["samples"], extent, f"samples, epoch {frame['epoch']}",
                 "tab:red")
    fig.suptitle(f"{snap['set']}: Real-NVP density (top) and samples (bottom) during training\n"
                 f"({cfg.n_couplings} couplings, constant learning rate "
                 f"{cfg.snapshot_learning_rate:g})", fontsize=10)
    fig.savefig(out / f"snapshots_{snap['set']}.png", dpi=90)
    plt.close(fig)


def _scatter(ax, X, extent, title, color) -> None:
    ax.scatter(X[:, 0], X[:, 1], s=1, alpha=0.4, color=color, linewidths=0)
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid_figure(out, cfg, rows, summary, results, tests, axis) -> None:
    plt = _plt()
    sets = [s for s in cfg.sets if cfg.axis_values(axis, s)]
    values = {s: [_value_str(v) for v in cfg.axis_values(axis, s)] for s in sets}
    n_cols = max(len(v) for v in values.values())
    fig, axes = plt.subplots(len(sets), n_cols, figsize=(2.1 * n_cols, 2.2 * len(sets)),
                             squeeze=False)
    stats = {(e["set"], e["value"]): e for e in summary if e["axis"] == axis}
    grids = {(r["set_name"], _fit_key(r)): r["_grid"] for r in results.values() if r and "_grid" in r}
    for i, s in enumerate(sets):
        for j in range(n_cols):
            ax = axes[i, j]
            if j >= len(values[s]):
                ax.axis("off")
                continue
            value = values[s][j]
            row = next((r for r in rows if r["axis"] == axis and r["set"] == s
                        and r["value"] == value and r["seed"] == 0), None)
            if row is None:
                ax.axis("off")
                continue
            test = tests[(s, row["noise"])]
            _density_image(ax, grids[(s, _fit_key(row))], test["extent"], _vmax(test))
            e = stats[(s, value)]
            ax.set_title(f"{value}\n{e['heldout_ll_mean']:+.2f} ± {e['heldout_ll_std']:.2f}",
                         fontsize=8)
            if j == 0:
                ax.set_ylabel(s, fontsize=9)
    fig.suptitle(f"Fitted density (seed 0) by {_AXIS_LABELS[axis]}\npanel title: value, "
                 "held-out mean log-likelihood (mean ± sd over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"grid_{axis}.png", dpi=80)
    plt.close(fig)


def _fit_key(row: dict) -> tuple:
    return (row["n_train"], row["noise"], row["n_couplings"], row["hidden"], row["activation"],
            row["mask"], row["seed"])


def _x_positions(axis, values):
    numeric = axis in {"couplings", "depth", "width", "samples", "noise", "depth_2_couplings"}
    return ([float(v) for v in values] if numeric else list(range(len(values)))), numeric


def _line_panel(ax, axis, entries, col, label=None, **kw) -> None:
    xs, numeric = _x_positions(axis, [e["value"] for e in entries])
    mean = np.array([e[f"{col}_mean"] for e in entries])
    std = np.array([e[f"{col}_std"] for e in entries])
    ok = np.isfinite(mean)
    ax.errorbar(np.array(xs)[ok], mean[ok], yerr=np.nan_to_num(std[ok]), marker="o",
                capsize=3, label=label, **kw)
    if not numeric:
        ax.set_xticks(xs, [e["value"] for e in entries], rotation=30, fontsize=8)
        return
    if axis in {"samples", "width", "noise"}:
        ax.set_xscale("log")
    ticks = sorted(set(getattr(ax, "_study_ticks", [])) | set(xs))
    ax._study_ticks = ticks
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8,
                  rotation=45 if len(ticks) > 6 else 0)
    ax.minorticks_off()


def _plain_log_labels(ax, values=()) -> None:
    """Label a log y axis with plain numbers (0.1, 1) rather than powers of ten; when
    ``values`` span less than two decades, also at 2 and 5 times each power of ten, so that
    a panel within one decade still has labelled ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if np.isfinite(v) and v > 0]
    if positive and np.log10(max(positive) / min(positive)) < 2:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _gap_scale(ax, gaps) -> None:
    """Log scale for positive gaps; symmetric log with readable ticks when some are <= 0."""
    if min(gaps) > 0:
        ax.set_yscale("log")
        _plain_log_labels(ax, gaps)
        return
    ax.set_yscale("symlog", linthresh=0.01)
    top = max(max(gaps), 0.01)
    ticks = [-0.1, -0.01, 0] + [10.0**k for k in range(-2, int(np.ceil(np.log10(top))) + 1)]
    ticks = [t for t in ticks if 1.5 * min(gaps) <= t <= 1.5 * top or t == 0]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])


def _lines_figure(out, cfg, summary, axis) -> None:
    plt = _plt()
    sets = [s for s in cfg.sets if any(e["set"] == s and e["axis"] == axis for e in summary)]
    fig, axes = plt.subplots(2, len(sets), figsize=(3.4 * len(sets), 5.6), squeeze=False)
    for j, s in enumerate(sets):
        entries = [e for e in summary if e["axis"] == axis and e["set"] == s]
        top, bottom = axes[0, j], axes[1, j]
        _line_panel(top, axis, entries, "heldout_ll", "held-out (mean ± sd)")
        _line_panel(top, axis, entries, "ceiling", "ceiling (true density)", ls="--",
                    color="k")
        _line_panel(bottom, axis, entries, "kl_gap", "mean gap (KL estimate)")
        _line_panel(bottom, axis, entries, "median_gap", "median gap")
        _gap_scale(bottom, [e[f"{c}_mean"] for e in entries for c in ("kl_gap", "median_gap")])
        top.set_title(s, fontsize=10)
        bottom.set_xlabel(_AXIS_LABELS[axis], fontsize=9)
    axes[0, 0].set_ylabel("held-out mean log-likelihood", fontsize=9)
    axes[1, 0].set_ylabel("ceiling - held-out (nats)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"lines_{axis}.png", dpi=90)
    plt.close(fig)


def _metric_figure(out, cfg, summary, axis, metrics, name, hline=None) -> None:
    """One row per metric, one line per set."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (col, ylabel, log) in zip(axes[0], metrics, strict=False):
        shown = []
        for s in cfg.sets:
            entries = [e for e in summary if e["axis"] == axis and e["set"] == s]
            if entries:
                _line_panel(ax, axis, entries, col, s)
                shown += [e[f"{col}_mean"] for e in entries]
        if hline is not None:
            ax.axhline(hline, color="k", ls="--", lw=1)
        if log:
            ax.set_yscale("log")
            _plain_log_labels(ax, shown)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel(_AXIS_LABELS[axis], fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)


def _cross_figure(out, cfg, summary) -> None:
    plt = _plt()
    sets = [s for s in cfg.sets if cfg.axis_values("samples_couplings", s)]
    fig, axes = plt.subplots(1, 2 * len(sets), figsize=(8 * len(sets), 3.6), squeeze=False)
    for j, s in enumerate(sets):
        entries = [e for e in summary if e["axis"] == "samples_couplings" and e["set"] == s]
        if not entries:
            continue
        for k in cfg.cross_couplings:
            mine = [dict(e, value=e["value"].split("/")[0]) for e in entries
                    if e["value"].endswith(f"/{k}")]
            _line_panel(axes[0, 2 * j], "samples", mine, "heldout_ll", f"{k} couplings")
            _line_panel(axes[0, 2 * j + 1], "samples", mine, "epochs_to_converge",
                        f"{k} couplings")
        axes[0, 2 * j].axhline(entries[0]["ceiling_mean"], color="k", ls="--", lw=1)
        axes[0, 2 * j].set_title(f"{s}: held-out log-likelihood", fontsize=10)
        axes[0, 2 * j + 1].set_title(f"{s}: epochs to converge", fontsize=10)
        for ax in axes[0, 2 * j: 2 * j + 2]:
            ax.set_xlabel("training samples", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lines_samples_couplings.png", dpi=90)
    plt.close(fig)


def _write_figures(out, cfg, rows, results, tests, snapshots) -> None:
    summary = summarize(rows)
    for snap in snapshots:
        _snapshot_figure(out, cfg, snap, tests[(snap["set"], STUDY_SETS[snap["set"]].noise)])
    axes = [a for a in AXES if any(r["axis"] == a for r in rows)]
    for axis in axes:
        if axis == "samples_couplings":
            _cross_figure(out, cfg, summary)
            continue
        _grid_figure(out, cfg, rows, summary, results, tests, axis)
        _lines_figure(out, cfg, summary, axis)
    if "samples" in axes:
        _metric_figure(out, cfg, summary, "samples", [
            ("seconds_per_epoch", "seconds per epoch", True),
            ("epochs_to_converge", "epochs to converge", True),
            ("steps_to_converge", "optimizer steps to converge", True),
        ], "convergence_samples.png")
    if "noise" in axes:
        _metric_figure(out, cfg, summary, "noise", [
            ("spread_ratio", "model spread / data spread", False),
            ("kl_gap", "ceiling - held-out (nats)", False),
        ], "noise_spread.png", hline=1.0)


# ----------------------------------------------------------------------------------- CLI


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sknvp.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke-run version")
    parser.add_argument("--sets", help=f"comma list from {sorted(STUDY_SETS)}")
    parser.add_argument("--axes", help=f"comma list from {list(AXES) + ['snapshots']}")
    parser.add_argument("--out", default="study_out", help="output folder (default study_out)")
    parser.add_argument("--seeds", type=int, help="seeds per setting (3 full, 1 quick)")
    parser.add_argument("--jobs", type=int, default=1, help="joblib worker processes")
    parser.add_argument("--steps", type=int, help="optimizer-step budget per fit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per fit")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore fits cached in OUT/cache by an earlier run")
    parser.add_argument("--report-only", action="store_true",
                        help="fit nothing; tables and figures from the cached fits only")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the time estimate and exit")
    return parser.parse_args(argv)


def _config_from_args(args) -> StudyConfig:
    changes = {"threads": args.threads, "device": args.device}
    if args.sets:
        changes["sets"] = tuple(s.strip() for s in args.sets.split(","))
        unknown = set(changes["sets"]) - set(STUDY_SETS)
        if unknown:
            raise SystemExit(f"unknown set(s) {sorted(unknown)}; choose from {sorted(STUDY_SETS)}")
    if args.axes:
        changes["axes"] = tuple(a.strip() for a in args.axes.split(","))
        unknown = set(changes["axes"]) - set(AXES) - {"snapshots"}
        if unknown:
            raise SystemExit(f"unknown axis/axes {sorted(unknown)}; choose from {list(AXES)}")
    if args.seeds:
        changes["seeds"] = args.seeds
    if args.steps:
        changes["steps"] = args.steps
    return (quick_config if args.quick else full_config)(**changes)


def main(argv=None) -> int:
    """Command-line entry point (``python -m sknvp.study --help``)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    cfg = _config_from_args(args)
    n_fits = len(_unique_fits(plan_fits(cfg)))
    if args.report_only:
        run_study(cfg, args.out, log=lambda line: print(line, flush=True), report_only=True)
        return 0
    estimate = estimate_seconds(cfg, args.jobs)
    print(f"{n_fits} fits on {', '.join(cfg.sets)}; at most {cfg.steps} optimizer steps each; "
          f"estimated at most {estimate / 60:.1f} min with {args.jobs} job(s) on this machine",
          flush=True)
    if args.estimate_only:
        return 0
    run_study(cfg, args.out, jobs=args.jobs, log=lambda line: print(line, flush=True),
              resume=not args.fresh, report_only=args.report_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
