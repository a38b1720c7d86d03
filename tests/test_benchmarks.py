"""The side-by-side benchmark script runs end to end in its quick mode.

Only that it runs and writes finite numbers is checked: the numbers of a quick run (a few hundred
rows, two epochs) mean nothing, and timings depend on the machine.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compare.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    bench = _load_script()
    out = tmp_path_factory.mktemp("bench")
    doc = out / "benchmarks.md"
    doc.write_text(
        f"# Benchmarks\n\nIntro kept.\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nTail kept.\n"
    )
    # (--heap default: the suite's process keeps glibc's own heap thresholds)
    results = bench.main(
        ["--quick", "--out", str(out), "--doc", str(doc), "--threads", "1", "--heap", "default"]
    )
    return bench, results, out, doc


def test_quick_run_writes_table_figure_and_json(quick_run):
    # The figure, the JSON and the markdown exist, and the doc's generated block was replaced.
    bench, results, out, doc = quick_run
    assert (out / "benchmarks.png").stat().st_size > 10_000
    assert json.loads((out / "results.json").read_text())["sets"].keys() == results["sets"].keys()
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nIntro kept.") and text.rstrip().endswith("Tail kept.")
    assert "old table" not in text and text.count(bench.BEGIN) == 1
    assert "| two moons" in text and "benchmarks.png" in text


def test_quick_run_numbers_are_finite(quick_run):
    # Every method that ran (peers may be absent) gives finite log-likelihoods, times and rates.
    bench, results, _, _ = quick_run
    assert set(results["sets"]) == set(bench.QUICK_SETS)
    for entry in results["sets"].values():
        methods = entry["methods"]
        for name in (bench.SKNVP_DEFAULT, bench.SKNVP_MATCHED, bench.KDE, bench.GMM):
            assert "error" not in methods[name], methods[name]
        for name, cell in methods.items():
            assert "error" not in cell, (name, cell)
            for key in (
                "loglik",
                "fit_wall_s",
                "fit_cpu_s",
                "score_rows_per_s",
                "sample_rows_per_s",
            ):
                assert math.isfinite(cell[key]) and (key == "loglik" or cell[key] > 0), (name, key)
    ceiling = results["sets"]["moons"]["ceiling"]
    assert -0.4 < ceiling < -0.2  # true density of two moons (noise 0.05) scores about -0.29


def test_steady_heap_fixes_glibcs_thresholds_and_the_run_records_it(quick_run):
    # In a process of its own (the thresholds stay fixed for the rest of a process): on glibc
    # both mallopt calls succeed and the description names the values; elsewhere None.
    import platform
    import subprocess

    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; "
        "spec.loader.exec_module(m); print(m.steady_heap())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert out == "glibc heap thresholds fixed (mmap 32 MiB, trim 1 GiB)"
    else:
        assert out == "None"
    # The fixture's run left the heap alone and says nothing about it; a run that fixed it
    # says so in the header of the tables.
    bench, results, _, _ = quick_run
    assert results["environment"]["heap"] is None
    assert "heap" not in bench._header(results)
    fixed = {**results, "environment": {**results["environment"], "heap": out}}
    assert f"{out}." in bench._header(fixed)


def test_run_records_the_processor_and_the_header_names_it(quick_run):
    # Ratios between methods depend on the host (AVX-512 against AVX2), so the run records
    # the processor and the vector instructions torch uses, and the tables' header says them.
    import torch

    bench, results, _, _ = quick_run
    cpu = results["environment"]["cpu"]
    assert cpu == bench.cpu_description()
    assert cpu.endswith(torch.backends.cpu.get_cpu_capability())
    assert f"CPUs ({cpu})," in bench._header(results)
    older = {**results, "environment": {**results["environment"], "cpu": None}}
    assert "CPUs, load average" in bench._header(older)  # runs recorded before this


def test_doc_block_created_when_markers_absent(tmp_path):
    # write_block appends the generated block to a file without markers and replaces it later.
    bench = _load_script()
    doc = tmp_path / "b.md"
    doc.write_text("# Title\n")
    bench.write_block(doc, "first")
    bench.write_block(doc, "second")
    text = doc.read_text()
    assert text.startswith("# Title") and "second" in text and "first" not in text


def test_merge_reruns_one_method_and_keeps_the_rest(quick_run):
    # --merge with one method replaces that cell only and logs the rerun in the doc block.
    bench, _, out, doc = quick_run
    before = json.loads((out / "results.json").read_text())
    bench.main(
        [
            "--quick",
            "--out",
            str(out),
            "--doc",
            str(doc),
            "--threads",
            "1",
            "--merge",
            "--sets",
            "moons",
            "--methods",
            bench.GMM,
        ]
    )
    after = json.loads((out / "results.json").read_text())
    assert list(after["sets"]) == list(before["sets"])  # rows keep their order
    moons_before, moons_after = before["sets"]["moons"], after["sets"]["moons"]
    assert moons_after["methods"].keys() == moons_before["methods"].keys()
    for name in moons_before["methods"]:
        if name != bench.GMM:
            assert moons_after["methods"][name] == moons_before["methods"][name]
    assert after["merged_runs"][-1]["cells"] == [f"{bench.GMM} on {moons_after['label']}"]
    text = doc.read_text()
    assert "Cells rerun with `--merge` since (the others are from the run above" in text
    rerun_rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rerun_rows) == 1 and rerun_rows[0].endswith(f"| {bench.GMM} on two moons (noise 0.05) |")


def test_interrupted_merge_run_keeps_the_sets_and_cells_it_did_not_reach(quick_run, monkeypatch):
    # The results file is rewritten after every cell; a --merge run stopped on its second set
    # must leave that set's earlier cells (and every other set) in it.
    bench, _, out, _ = quick_run
    before = json.loads((out / "results.json").read_text())
    sets = list(before["sets"])
    assert len(sets) >= 2
    real_run_cell, calls = bench.run_cell, []

    def stop_on_second_set(name, ds, cfg):
        calls.append(ds.label)
        if ds.label == before["sets"][sets[1]]["label"]:
            raise KeyboardInterrupt
        return real_run_cell(name, ds, cfg)

    monkeypatch.setattr(bench, "run_cell", stop_on_second_set)
    cfg = bench.Config.make_quick()
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(cfg, sets[:2], [bench.GMM], out, merge=True, threads=1)
    after = json.loads((out / "results.json").read_text())
    assert set(after["sets"]) == set(before["sets"])
    assert after["sets"][sets[1]]["methods"] == before["sets"][sets[1]]["methods"]
    first_before, first_after = before["sets"][sets[0]]["methods"], after["sets"][sets[0]]["methods"]
    assert first_after.keys() == first_before.keys()
    for name in first_before:
        if name != bench.GMM:
            assert first_after[name] == first_before[name]
    assert first_after[bench.GMM]["date"] == after["merged_runs"][-1]["environment"]["date"]


BUDGET_SCRIPT = SCRIPT.with_name("bench_budget.py")


def test_budget_script_quick_run_and_resume(tmp_path):
    # The budget script fits every budget, writes its table into the doc's block, and a resumed
    # run keeps the cells it has instead of refitting them.
    spec = importlib.util.spec_from_file_location("bench_budget", BUDGET_SCRIPT)
    budget = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budget)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{budget.BEGIN}\nold\n{budget.END}\n")
    argv = ["--quick", "--sets", "moons", "--jobs", "1", "--out", str(tmp_path), "--doc", str(doc)]
    results = budget.main(argv)
    cells = results["cells"]
    assert {c["budget"] for c in cells.values()} == set(budget.BUDGETS)
    for cell in cells.values():
        assert math.isfinite(cell["loglik"]) and math.isfinite(cell["loglik_train"])
        assert cell["n_iter"] == 2 and cell["fit_cpu_s"] > 0
        assert -0.4 < cell["ceiling"] < -0.2
    large = next(c for c in cells.values() if c["budget"] == "large")
    assert large["params"]["n_couplings"] == 16
    text = doc.read_text()
    assert "old" not in text and text.count("| two moons") == 1 and "large (16 x" in text
    stamp = {k: c["fit_wall_s"] for k, c in cells.items()}
    again = budget.main([*argv, "--resume"])
    assert {k: c["fit_wall_s"] for k, c in again["cells"].items()} == stamp


SMALL_SCRIPT = SCRIPT.with_name("bench_small.py")


def test_small_data_script_quick_run(tmp_path):
    # The small-data script fits every method on real tabular and 2-D data, reports the
    # median and lowest held-out row beside the mean, and writes its block into the doc.
    spec = importlib.util.spec_from_file_location("bench_small", SMALL_SCRIPT)
    small = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{small.BEGIN}\nstale table\n{small.END}\n")
    argv = ["--quick", "--sets", "diabetes,moons", "--seeds", "0,1", "--jobs", "1",
            "--out", str(tmp_path), "--doc", str(doc)]
    results = small.main(argv)
    cells = list(results["cells"].values())
    assert len(cells) == 2 * 2 * len(small.METHODS)
    for cell in cells:
        assert cell["lowest"] <= cell["median"] and math.isfinite(cell["loglik"])
        assert (cell["n_train"], cell["n_test"]) == (120, 40)
    # The split depends on the seed, and both seeds' scores are reported.
    first, second = small.load("diabetes", 0, True)[0], small.load("diabetes", 1, True)[0]
    assert not np.array_equal(first, second)
    text = doc.read_text()
    assert "stale table" not in text and text.count("| diabetes (10-D) |") == 2
    assert "(input_noise=0.05)" in text


def test_small_data_script_small_2d_sets_score_a_separate_draw():
    spec = importlib.util.spec_from_file_location("bench_small", SMALL_SCRIPT)
    small = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(small)
    for name in ("moons_150", "circles_150", "two_spirals_150"):
        train, test = small.load(name, 3, False)
        assert train.shape == (150, 2) and test.shape == (5000, 2)
        # Test rows come from another draw, not from the training rows' own.
        assert not np.isin(test[:, 0], train[:, 0]).any()
        assert not np.array_equal(train, small.load(name, 4, False)[0])


def test_per_epoch_matmul_calls_cancel_what_every_fit_does_once():
    # 2-epoch fit - 1-epoch fit: calls made once per fit (setup, final evaluation) cancel.
    bench = _load_script()
    once = ("aten::addmm", ((64,), (10000, 2), (2, 64)))  # e.g. scoring the training rows
    step = ("aten::mm", ((512, 64), (64, 64)))
    one = bench.Counter({once: 1, step: 20})
    two = bench.Counter({once: 1, step: 40})
    assert bench._per_epoch(one, two) == bench.Counter({step: 20})


def _quick_mode_run(bench, tmp_path, mode, markers):
    """``bench_compare.py --quick --MODE`` on moons into a doc holding an old block between
    ``markers``: returns the raw json, and checks the doc block was replaced
    with exactly that text while the rest of the doc was kept."""
    begin, end = markers
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{begin}\nold block\n{end}\n\nTail kept.\n")
    text = bench.main(
        ["--quick", f"--{mode}", "--sets", "moons", "--out", str(tmp_path), "--doc", str(doc),
         "--threads", "1"]
    )
    written = doc.read_text()
    assert "old block" not in written and "Tail kept." in written
    assert "| two moons (noise 0.05) |" in text and text.strip() in written
    return json.loads((tmp_path / f"{mode}.json").read_text())


def test_floor_quick_run_writes_table_json_and_doc_block(tmp_path):
    bench = _load_script()
    raw = _quick_mode_run(bench, tmp_path, "floor", (bench.FBEGIN, bench.FEND))
    ours = raw["moons"][bench.SKNVP_MATCHED]
    # A quick fit is one step per epoch: 8 couplings x 3 layers forward, and backward matmuls.
    assert ours["matmul_calls"] >= 8 * 3 * 2
    assert 0 < ours["matmul_cpu_s"] < 1 and math.isfinite(ours["epoch_cpu_s"])
    for entry in raw["moons"].values():  # peers, where installed, measured the same way
        assert entry["matmul_calls"] > 0 and entry["matmul_cpu_s"] > 0


def test_backprop_quick_run_times_both_gradients_and_writes_doc_block(tmp_path):
    bench = _load_script()
    raw = _quick_mode_run(bench, tmp_path, "backprop", (bench.BBEGIN, bench.BEND))
    for label in (bench.SKNVP_MATCHED, bench.SKNVP_DEFAULT):
        times = raw["moons"][label]
        assert set(times) == {"hand-derived_epoch_cpu_s", "autograd_epoch_cpu_s"}
        assert all(math.isfinite(v) for v in times.values())


def test_gradient_switch_forces_autograd_and_restores_the_hand_derived_one():
    bench = _load_script()
    import sknvp._training as training
    from sknvp.flows import build_realnvp

    flow = build_realnvp(2, 2, (4,))
    assert training.manual_gradient(flow) is not None
    with bench._gradient("autograd"):
        assert training.manual_gradient(flow) is None
    with bench._gradient("hand-derived"):
        assert training.manual_gradient(flow) is not None
    assert training.manual_gradient(flow) is not None


def test_profile_quick_run_times_sknvp_and_peers_epochs(tmp_path):
    bench = _load_script()
    text = bench.main(
        ["--quick", "--profile", "--sets", "moons", "--out", str(tmp_path), "--doc", "none",
         "--threads", "1"]
    )
    summary = json.loads((tmp_path / "profile.json").read_text())
    assert summary["macs_per_row"] == 8 * (1 * 64 + 64 * 64 + 64 * 2)  # 8 couplings of 2x64
    assert math.isfinite(summary["epoch"]["epoch_cpu_s"]) and summary["aten_calls"] > 0
    assert "| sknvp (matched) |" in text


SCALING_SCRIPT = SCRIPT.with_name("bench_scaling.py")


def test_base_cost_quick_run_times_both_bases_and_writes_doc_block(tmp_path):
    # --base-cost times an epoch and the one-off start on the normal and the mixture base
    # (each in a fresh process), and writes its CSV, figure and block into the doc.
    spec = importlib.util.spec_from_file_location("bench_scaling", SCALING_SCRIPT)
    scaling = importlib.util.module_from_spec(spec)
    sys.modules["bench_scaling"] = scaling  # its dataclass looks its module up there
    spec.loader.exec_module(scaling)
    doc = tmp_path / "scale_out.md"
    doc.write_text(f"# Scaling out\n\n{scaling.BASE_BEGIN}\nstale\n{scaling.BASE_END}\n")
    rows = scaling.main(["--base-cost", "--quick", "--threads", "1", "--out", str(tmp_path),
                         "--doc", str(doc)])
    assert sorted((r["n_features"], r["base"]) for r in rows) == [
        (2, "mixture"), (2, "normal"), (4, "mixture"), (4, "normal")]
    for r in rows:
        assert math.isfinite(r["cpu_s_per_epoch"]) and r["startup_cpu_s"] > -1.0
        assert (r["n_components"] >= 1) == (r["base"] == "mixture")
    assert (tmp_path / "base_cost.csv").exists() and (tmp_path / "scaling_base.png").exists()
    text = doc.read_text()
    assert "stale" not in text and text.count("| 2 | ") == 1 and "scaling_base.png" in text


def test_matched_flow_masks_even_then_odd_features_as_nflows_and_zuko():
    bench = _load_script()
    masks = bench.peer_masks(4, 5)
    assert masks.tolist() == [[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]] * 2
    # nflows' SimpleRealNVP: -1 (identity, kept) on the even features of the first layer.
    nflows_first = np.ones(5)
    nflows_first[::2] = -1
    assert np.array_equal(masks[0] == 1, nflows_first == -1)
    rng = np.random.RandomState(0)
    for d in (2, 5):
        X = rng.normal(size=(120, d))
        params = dict(bench.matched_params(bench.Config.make_quick(), 0), max_iter=1)
        est = bench.matched_density(**params).fit(X)
        assert est.mask == "peers"  # the parameter is left as given
        kept = [m.mask.int().tolist() for m in est.module_.modules() if hasattr(m, "mask")]
        assert kept == bench.peer_masks(params["n_couplings"], d).tolist()
    # In 2-D these are "alternating"'s masks: the same flow as the halves.
    from sknvp import RealNVPDensity

    X2 = rng.normal(size=(120, 2))
    halves = RealNVPDensity(**dict(params, mask="alternating")).fit(X2)
    np.testing.assert_array_equal(
        bench.matched_density(**params).fit(X2).score_samples(X2), halves.score_samples(X2)
    )


def test_oracle_gap_script_runs_and_an_estimated_density_falls_short_of_the_truth():
    spec = importlib.util.spec_from_file_location(
        "oracle_gap", SCRIPT.parent / "oracle_gap.py"
    )
    oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oracle)
    (row,) = oracle.main(["--quick"])
    gaps = [row[name] for name in oracle.ESTIMATORS]
    # Five 10-D components of 65 parameters each, from 2,000 rows: short of the truth.
    assert all(math.isfinite(g) and 0.0 < g < 1.0 for g in gaps)
