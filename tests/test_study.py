"""Smoke tests of the 2-D reproduction study: outputs exist and are sane (no golden numbers)."""

import csv
import json
import math

import numpy as np
import pytest

from sknvp.study import (
    AXES,
    STUDY_SETS,
    full_config,
    main,
    plan_fits,
    quick_config,
    run_study,
    summarize,
)

TINY = dict(
    sets=("moons", "spiral2"), axes=("couplings", "noise", "mask", "snapshots"), seeds=2,
    n_train=200, n_test=300, steps=12, patience_steps=50, couplings=(1, 2),
    masks=("fixed", "alternating"), noise_levels=2, snapshot_epochs=(1, 3), grid_size=16,
    n_couplings=2, width=8,
)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    lines = []
    cfg = quick_config(**TINY)
    rows = run_study(cfg, out, log=lines.append)
    return cfg, out, rows, lines


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_results_table_has_every_axis_point_and_seed(tiny_study):
    cfg, out, rows, _ = tiny_study
    table = _read_csv(out / "results.csv")
    expected = sum(
        len(cfg.axis_values(axis, s)) * cfg.seeds
        for s in cfg.sets for axis in cfg.axes if axis in AXES
    )
    assert len(table) == len(rows) == expected
    for col in ("axis", "set", "value", "seed", "heldout_ll", "ceiling", "kl_gap",
                "fit_seconds", "epochs", "epochs_to_converge", "spread_ratio"):
        assert col in table[0]
    assert {r["axis"] for r in table} == {"couplings", "noise", "mask"}
    assert {r["value"] for r in table if r["axis"] == "couplings"} == {"1", "2"}
    for r in table:
        assert math.isfinite(float(r["heldout_ll"]))
        assert math.isfinite(float(r["ceiling"]))
        assert float(r["fit_seconds"]) > 0
        assert 1 <= int(r["epochs"]) <= int(r["max_iter"])
    # the ceiling is the true density's own score: a flow after 12 steps cannot beat it by much
    assert all(float(r["kl_gap"]) > -0.2 for r in table)


def test_noise_axis_uses_the_set_levels_and_its_own_ceiling(tiny_study):
    _, out, rows, _ = tiny_study
    noise_rows = [r for r in rows if r["axis"] == "noise" and r["set"] == "moons"]
    assert sorted({r["noise"] for r in noise_rows}) == list(STUDY_SETS["moons"].noise_levels[:2])
    ceilings = {r["noise"]: r["ceiling"] for r in noise_rows}
    assert ceilings[0.01] > ceilings[0.05]  # less noise, lower entropy


def test_summary_and_json(tiny_study):
    cfg, out, rows, _ = tiny_study
    summary = _read_csv(out / "summary.csv")
    assert len(summary) == len(rows) // cfg.seeds
    assert all(int(e["n_seeds"]) == cfg.seeds for e in summary)
    meta = json.loads((out / "results.json").read_text())
    assert len(meta["rows"]) == len(rows)
    assert meta["config"]["steps"] == cfg.steps


def test_figures_are_written(tiny_study):
    cfg, out, _, _ = tiny_study
    names = [f"snapshots_{s}.png" for s in cfg.sets]
    names += [f"{kind}_{axis}.png" for axis in ("couplings", "noise", "mask")
              for kind in ("grid", "lines")]
    names += ["noise_spread.png"]
    for name in names:
        assert (out / name).stat().st_size > 5000, name


def test_progress_is_reported_per_fit(tiny_study):
    cfg, _, rows, lines = tiny_study
    n_fits = len({tuple(sorted((k, str(v)) for k, v in r.items() if k not in ("axis", "value")))
                  for r in rows})
    fit_lines = [line for line in lines if line.startswith("[")]
    assert len(fit_lines) == n_fits
    assert fit_lines[-1].startswith(f"[{n_fits}/{n_fits}]")


def test_summarize_mean_and_spread():
    rows = [{"axis": "a", "set": "s", "value": "1", **{c: v for c in (
        "heldout_ll", "ceiling", "kl_gap", "median_gap", "tail_fail_frac", "spread_ratio",
        "fit_seconds", "seconds_per_epoch", "epochs", "epochs_to_converge",
        "steps_to_converge")}} for v in (1.0, 3.0)]
    (entry,) = summarize(rows)
    assert entry["heldout_ll_mean"] == 2.0
    assert entry["heldout_ll_std"] == pytest.approx(np.sqrt(2.0))


def test_full_plan_covers_the_issue():
    cfg = full_config()
    assert cfg.seeds >= 3
    assert cfg.sets == ("moons", "circles", "spiral2", "spiral4")
    assert cfg.couplings == (1, 2, 3, 4, 6, 8)
    assert cfg.depths == (1, 2, 3, 4, 5, 6)
    assert cfg.samples == (500, 2000, 10_000, 50_000)
    assert set(cfg.activations) == {"relu", "leaky_relu", "tanh", "elu"}
    assert set(cfg.masks) == {"fixed", "alternating", "checkerboard", "random"}
    plan = plan_fits(cfg)
    fits = {fit for *_, fit in plan}
    assert len(fits) < len(plan)  # the baseline is shared between axes, fitted once
    for s in cfg.sets:
        assert len(cfg.axis_values("noise", s)) >= 3


def test_cli_estimate_only(capsys):
    assert main(["--quick", "--sets", "moons", "--axes", "couplings", "--estimate-only"]) == 0
    out = capsys.readouterr().out
    assert "3 fits on moons" in out and "estimated at most" in out


def test_cli_rejects_unknown_set():
    with pytest.raises(SystemExit, match="unknown set"):
        main(["--quick", "--sets", "moons,swiss_roll", "--estimate-only"])


@pytest.mark.slow
def test_quick_mode_end_to_end_with_two_jobs(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--jobs", "2"]) == 0
    table = _read_csv(tmp_path / "results.csv")
    assert {r["set"] for r in table} == {"moons", "circles", "spiral2", "spiral4"}
    assert all(math.isfinite(float(r["heldout_ll"])) for r in table)
    assert (tmp_path / "snapshots_moons.png").stat().st_size > 5000


def test_rerun_uses_the_cache_and_report_only_skips_missing_fits(tiny_study, tmp_path):
    import shutil

    cfg, out, rows, _ = tiny_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    lines = []
    again = run_study(cfg, copy, log=lines.append)
    assert not [line for line in lines if line.startswith("[")]  # nothing refitted
    assert [r["heldout_ll"] for r in again] == [r["heldout_ll"] for r in rows]
    fit_files = sorted((copy / "cache").glob("fit_*.json"))
    fit_files[0].unlink()
    partial = run_study(cfg, copy, log=lines.append, report_only=True)
    assert 0 < len(partial) < len(rows)
    assert (copy / "lines_couplings.png").stat().st_size > 5000


@pytest.mark.parametrize("gaps", [[0.44, 0.52, 0.61], [0.15, 0.35], [0.002, 0.2]])
def test_a_gap_panel_within_a_decade_still_has_labelled_ticks(gaps):
    # The activation figure's circles and spiral4 panels (gaps 0.15-0.35, 0.44-0.61) had no
    # tick label at all: only powers of ten were labelled, and none fell in their range.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sknvp.study import _gap_scale

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2][: len(gaps)], gaps)
    _gap_scale(ax, gaps)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [
        t.get_text() for t, v in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)
        if lo <= v <= hi and t.get_text()
    ]
    plt.close(fig)
    assert len(labels) >= 2, labels
    assert all("10^" not in text and "e" not in text for text in labels), labels
