"""The training loop's stopping rule (``sknvp._training.fit_flow``) on modules whose validation
curve is known in advance."""

import math

import pytest
import torch
from torch import nn

from sknvp._training import fit_flow, gain_in_standard_errors


class GaussianMean(nn.Module):
    """Unit-variance Gaussian with a learnable mean: the smallest module with ``log_prob``."""

    def __init__(self, mean: float = 0.0) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor([mean], dtype=torch.float64))

    def log_prob(self, x):
        return -0.5 * ((x[:, 0] - self.mean) ** 2) - 0.5 * math.log(2 * math.pi)


class Flat(GaussianMean):
    """A log-density that does not depend on the parameter: every epoch is a plateau."""

    def log_prob(self, x):
        return -0.5 * x[:, 0] ** 2 + 0.0 * self.mean


def _data(loc, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return loc + torch.randn(n, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_plateau_at_a_large_step_size_lowers_it_once_before_stopping(schedule):
    x = _data(0.0)
    lines = []
    result, optimizer = fit_flow(
        Flat(), x, x_valid=x, max_iter=200, batch_size=16, learning_rate_init=1e-2,
        learning_rate=schedule, n_iter_no_change=5, generator=torch.Generator().manual_seed(0),
        verbose=1, print_fn=lines.append,
    )
    lr_at_drop = 1e-2 * (1 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * 4 / 200)))
    expected_line = (
        f"Epoch 5: no improvement for 5 epochs at learning rate {lr_at_drop:.3g}; "
        "best weights restored, learning rate x 0.1"
    )
    assert [line for line in lines if "learning rate x 0.1" in line] == [expected_line]
    # Epochs 0-4 without improvement: the rate is still the initial one, so it is divided
    # by ten and counting restarts; the second plateau (epochs 5-9) ends training.
    assert result.lr_drops == [4]
    assert result.converged and result.n_iter == 10
    expected = 1e-3 if schedule == "constant" else 1e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 200))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_plateau_factor_one_stops_at_the_first_plateau():
    x = _data(0.0)
    result, _ = fit_flow(
        Flat(), x, x_valid=x, max_iter=200, batch_size=16, learning_rate_init=1e-2,
        learning_rate="constant", n_iter_no_change=5, plateau_factor=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.lr_drops == [] and result.converged and result.n_iter == 5


def test_a_late_plateau_of_the_cosine_schedule_stops_without_a_drop():
    # With 20 epochs the cosine rate is below a tenth of the initial one from epoch 16 on;
    # a plateau counted to epoch 17 then ends training as before.
    x = _data(0.0)
    flat = Flat()
    result, _ = fit_flow(
        flat, x, x_valid=x, max_iter=20, batch_size=16, learning_rate_init=1e-2,
        learning_rate="cosine", n_iter_no_change=18, generator=torch.Generator().manual_seed(0),
    )
    assert 0.5 * (1 + math.cos(math.pi * 17 / 20)) < 0.1 < 0.5 * (1 + math.cos(math.pi * 15 / 20))
    assert result.lr_drops == [] and result.converged and result.n_iter == 18


def test_the_drop_restarts_from_the_best_weights():
    # Training pulls the mean towards 3 while the validation rows sit at 0: the initial
    # weights are the best ones, so the drop must put the mean back at 0 and the next epoch
    # must score far better than the one before the drop.
    x_train, x_valid = _data(3.0, seed=1), _data(0.0, seed=2)
    module = GaussianMean(0.0)
    result, _ = fit_flow(
        module, x_train, x_valid=x_valid, max_iter=200, batch_size=8, learning_rate_init=0.1,
        learning_rate="constant", n_iter_no_change=3, generator=torch.Generator().manual_seed(0),
    )
    (drop,) = result.lr_drops
    scores = result.validation_scores
    assert drop == 2 and result.n_iter == 6
    assert scores[drop + 1] > scores[drop] + 0.5
    assert module.mean.detach().item() == 0.0  # the best (initial) weights are restored at the end


def test_plateau_factor_is_checked():
    with pytest.raises(ValueError, match="plateau_factor"):
        fit_flow(Flat(), _data(0.0), max_iter=1, plateau_factor=0.0)


# ------------------------------------------------------- snapshots and the finiteness check


def _small_flow():
    from sknvp.flows import build_realnvp

    torch.manual_seed(0)
    return build_realnvp(3, n_couplings=2, hidden_layer_sizes=(8,), batch_norm=True)


@pytest.mark.parametrize("how", ["snapshot", "snapshots"])
def test_snapshot_is_independent_of_later_training_and_restores_exactly(how):
    from sknvp._training import _snapshot, _Snapshots

    flow = _small_flow()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    if how == "snapshots":  # the tensors are looked up once: train a little first
        snapshots = _Snapshots(flow)
        take = snapshots.take
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.5)
        before = {k: v.clone() for k, v in flow.state_dict().items()}
    else:
        take = lambda: _snapshot(flow)
    snap = take()
    assert snap.keys() == before.keys()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(1.0)
    flow.train()
    flow.log_prob(torch.randn(16, 3))  # updates batch-norm running statistics
    assert all(torch.equal(snap[k], before[k]) for k in before)
    assert any(not torch.equal(v, before[k]) for k, v in flow.state_dict().items())
    flow.load_state_dict(snap)
    assert all(torch.equal(v, before[k]) for k, v in flow.state_dict().items())
    assert snap._metadata == flow.state_dict()._metadata  # versions kept for loading


def _shift_parameters(flow, by):
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(by)
    return {k: v.clone() for k, v in flow.state_dict().items()}


def test_kept_snapshot_survives_later_snapshots_and_unkept_ones_are_reused():
    from sknvp._training import _Snapshots

    flow = _small_flow()
    snapshots = _Snapshots(flow)
    first = _shift_parameters(flow, 0.0)
    kept = snapshots.take()
    snapshots.keep(kept)
    for step in range(1, 5):  # later snapshots, never kept, each of a new state
        state = _shift_parameters(flow, 1.0)
        latest = snapshots.take()
        assert latest is not kept
        assert all(torch.equal(latest[k], state[k]) for k in state), step
        assert all(torch.equal(kept[k], first[k]) for k in first), step
        assert all(v.data_ptr() != flow.state_dict()[k].data_ptr() for k, v in latest.items())
    # Only two sets of tensors: the unkept snapshot's are written again by the next take.
    assert snapshots.take() is latest
    snapshots.keep(latest)  # the latest becomes the kept one; the next take reuses the other
    state = _shift_parameters(flow, 1.0)
    again = snapshots.take()
    assert again is kept and all(torch.equal(again[k], state[k]) for k in state)
    flow.log_prob(torch.randn(16, 3))  # batch-norm statistics move too
    snapshots.restore(latest)  # one in-place copy: every state tensor, buffers included
    assert all(torch.equal(v, latest[k]) for k, v in flow.state_dict().items())
    foreign = {k: v + 1 if v.is_floating_point() else v for k, v in latest.items()}
    snapshots.restore(foreign)  # not one of its snapshots: load_state_dict
    assert all(torch.equal(v, foreign[k]) for k, v in flow.state_dict().items())


def test_snapshots_of_a_module_with_non_tensor_state_are_fresh_copies():
    from torch import nn

    from sknvp._training import _Snapshots

    class WithExtraState(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3))
            self.note = {"epoch": 0}

        def get_extra_state(self):
            return dict(self.note)

        def set_extra_state(self, state):
            self.note = dict(state)

    module = WithExtraState()
    snapshots = _Snapshots(module)
    first = snapshots.take()
    with torch.no_grad():
        module.weight.add_(1.0)
    module.note["epoch"] = 1
    second = snapshots.take()
    assert first is not second
    assert torch.equal(first["weight"], torch.zeros(3)) and first["_extra_state"] == {"epoch": 0}
    assert torch.equal(second["weight"], torch.ones(3)) and second["_extra_state"] == {"epoch": 1}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_params_finite_sees_one_bad_value_in_any_parameter(bad):
    from sknvp._training import _params_finite

    flow = _small_flow()
    assert _params_finite(list(flow.parameters()))
    params = list(flow.parameters())
    for i in (0, len(params) // 2, len(params) - 1):
        probe = list(_small_flow().parameters())
        with torch.no_grad():
            probe[i].view(-1)[-1] = bad
        assert not _params_finite(probe), i
    assert _params_finite([])  # no parameters: nothing to be non-finite


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mixed", [False, True])
def test_finiteness_check_follows_the_parameters_in_place(bad, mixed):
    from sknvp._training import _finiteness_check

    flow = _small_flow()
    if mixed:  # parameters of two dtypes: the unprepared check
        flow.transform[-1].double()
    params = list(flow.parameters())
    check = _finiteness_check(params)
    assert check()
    for i in (0, len(params) // 2, len(params) - 1):
        with torch.no_grad():
            saved = params[i].view(-1)[-1].item()
            params[i].view(-1)[-1] = bad  # changed in place after the check was made
        assert not check(), i
        with torch.no_grad():
            params[i].view(-1)[-1] = saved
        assert check(), i
    assert _finiteness_check([])()


def _vector_flow(d=4, seed=0):
    from sknvp.flows import build_realnvp

    torch.manual_seed(seed)
    return build_realnvp(d, 4, (16,), "relu", "alternating").double()


def _count_scoring_passes(monkeypatch):
    from sknvp import _training

    calls = []
    for name in ("_validation_score", "_initial_score"):
        real = getattr(_training, name)
        monkeypatch.setattr(
            _training, name, lambda *a, real=real, name=name: calls.append(name) or real(*a)
        )
    return calls


@pytest.mark.parametrize("lr", [1e-3, 10.0])
def test_one_batch_epochs_score_the_kept_weights_without_extra_passes(monkeypatch, lr):
    # With every training row in one batch an epoch's loss is the exact training loss of the
    # weights it started from: one pass (the final weights') replaces three, and the weights
    # kept are the best of the initial, intermediate and final ones all the same.
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = _count_scoring_passes(monkeypatch)
    flow = _vector_flow()
    initial = evaluate(flow, x)
    result, _ = fit_flow(flow, x, max_iter=6, batch_size=64, learning_rate_init=lr,
                         learning_rate="constant", n_iter_no_change=100,
                         generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    kept = evaluate(flow, x)
    # the epoch losses are the scores of the weights at each epoch's start
    assert result.loss_curve[0] == pytest.approx(-initial, rel=1e-10)
    best_start = max(-min(result.loss_curve), initial)
    assert kept >= best_start - 1e-9
    if lr == 10.0:  # steps that ruin the flow: the initial weights come back
        assert result.loss_curve[-1] > result.loss_curve[0] + 1
        assert kept == pytest.approx(initial, rel=1e-12)
        assert result.best_epoch == -1
    else:
        assert kept > initial and result.best_epoch == 5  # the final weights


def test_several_batches_still_score_the_initial_and_kept_weights(monkeypatch):
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = _count_scoring_passes(monkeypatch)
    fit_flow(_vector_flow(), x, max_iter=3, batch_size=32,
             generator=torch.Generator().manual_seed(0))
    # initial weights, then the final and the kept candidate
    assert calls == ["_initial_score", "_validation_score", "_validation_score"]


def evaluate(flow, x):
    from sknvp._training import evaluate_log_prob

    return float(evaluate_log_prob(flow, x).mean())


def test_a_one_batch_epoch_is_not_shuffled():
    # The loss and gradient of a batch of every row do not depend on the rows' order: the
    # epoch uses the rows as they are and draws no permutation.
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for batch_size, shuffled in ((64, False), (16, True)):
        gen = torch.Generator().manual_seed(0)
        state = gen.get_state()
        fit_flow(_vector_flow(), x, max_iter=2, batch_size=batch_size, generator=gen)
        assert torch.equal(gen.get_state(), state) != shuffled


class _Recorder(GaussianMean):
    """Records, at every call, whether this thread flushes subnormal numbers to zero."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def log_prob(self, x):
        from sknvp._training import _flushes_denormals

        self.modes.append(_flushes_denormals())
        return super().log_prob(x)


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no flush-to-zero mode here")
@pytest.mark.parametrize("outside", [False, True])
def test_training_flushes_subnormals_and_restores_the_threads_mode(outside):
    # Subnormal numbers made a long default fit 5 times slower (checkerboard: 101 against 18
    # CPU s): training runs with the thread's flush-to-zero mode on, and leaves the mode as
    # it found it.
    from sknvp._training import _flushes_denormals

    torch.set_flush_denormal(outside)
    try:
        module = _Recorder()
        x = _data(0.5)
        fit_flow(module, x, x_valid=x, max_iter=3, batch_size=16)
        assert module.modes and all(module.modes)
        assert _flushes_denormals() == outside
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flushing_step_zeroes_negligible_weights_and_adam_moments(dtype):
    # torch's worker threads keep their own mode, so every few steps the weights and Adam's
    # first moments below the square root of the smallest normal float (whose squares and
    # products underflow in those threads) and the subnormal second moments are set to zero;
    # everything else is left alone.
    from sknvp._training import _flushing_step, make_adam

    tiny = torch.finfo(dtype).tiny
    root = tiny**0.5
    layer = nn.Linear(3, 4).to(dtype)
    optimizer = make_adam(layer, 1e-3, 0.0)
    layer(torch.ones(2, 3, dtype=dtype)).sum().backward()
    optimizer.step()
    state = optimizer.state[layer.weight]
    calls = []
    step = _flushing_step(lambda: calls.append(1), layer, optimizer, every=2)
    with torch.no_grad():
        layer.weight[0, 0] = tiny / 4  # subnormal
        layer.weight[0, 1] = -root / 8  # normal, but its square underflows
        layer.weight[1, 1] = 3 * root  # kept
        state["exp_avg"][0, 2] = root / 2
        state["exp_avg"][1, 2] = -4 * root  # kept
        state["exp_avg_sq"][2, 2] = tiny / 16
        state["exp_avg_sq"][3, 2] = 3 * tiny  # a square of a small gradient: kept
    step()
    assert layer.weight[0, 1] == -root / 8  # not yet: every second step
    step()
    assert len(calls) == 2
    assert layer.weight[0, 0] == 0 and layer.weight[0, 1] == 0
    assert layer.weight[1, 1] == 3 * root
    assert state["exp_avg"][0, 2] == 0 and state["exp_avg"][1, 2] == -4 * root
    assert state["exp_avg_sq"][2, 2] == 0 and state["exp_avg_sq"][3, 2] == 3 * tiny
    for t in [*layer.parameters(), state["exp_avg"]]:
        assert not bool(((t != 0) & (t.abs() < root)).any())
    assert not bool(((state["exp_avg_sq"] != 0) & (state["exp_avg_sq"] < tiny)).any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zeroing_tiny_numbers_keeps_half_precision_weights(dtype):
    # The square-root bound is for float32 and float64 (1e-19, 1e-154); float16's would be
    # 0.0078, the size of a weight: half-precision tensors only lose their subnormals.
    from sknvp._training import _zero_tiny_

    tiny = torch.finfo(dtype).tiny
    t = torch.tensor([1e-3, -2e-3, tiny / 4, 0.5], dtype=dtype)
    _zero_tiny_([t], power=0.5)
    assert t.tolist() == torch.tensor([1e-3, -2e-3, 0.0, 0.5], dtype=dtype).tolist()


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no flush-to-zero mode here")
def test_worker_threads_started_during_training_do_not_keep_the_mode():
    # Threads inherit the floating-point mode of the thread that starts them: torch's worker
    # threads, made on the process's first parallel operation, would keep flush-to-zero for
    # good if that operation ran inside the block (half the elements of a later parallel
    # division by two flushed). A fresh process, so that no worker thread exists yet.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from sknvp._training import flush_denormals\n"
        "torch.set_num_threads(2)\n"
        "x = torch.full((1,), torch.finfo(torch.float32).tiny).expand(1 << 22)\n"  # a view
        "with flush_denormals():\n"
        "    inside = int(((x / 2) == 0).sum())\n"
        "print(inside, int(((x / 2) == 0).sum()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    inside, after = int(out[0]), int(out[1])
    assert inside > 0  # the calling thread flushed inside the block
    assert after == 0  # and nothing flushes after it


def _fit_from(mean, x_train, x_valid, min_gain_se):
    module = GaussianMean(mean)
    result, _ = fit_flow(
        module, x_train, x_valid=x_valid, max_iter=30, batch_size=32, learning_rate_init=0.05,
        learning_rate="constant", generator=torch.Generator().manual_seed(0),
        min_gain_se=min_gain_se,
    )
    return module, result


def test_the_best_epoch_must_beat_the_start_by_min_gain_se_standard_errors():
    # Training moves the mean from 0.3 towards the training rows' 0; the 20 validation rows
    # score that higher, but by less than one standard error of the per-row difference.
    x_train, x_valid = _data(0.0, n=256, seed=1), _data(0.0, n=20, seed=2)
    trained, plain = _fit_from(0.3, x_train, x_valid, 0.0)
    assert plain.best_epoch >= 0 and not plain.start_kept_within_noise
    start = GaussianMean(0.3)
    with torch.no_grad():
        z = gain_in_standard_errors(trained.log_prob(x_valid), start.log_prob(x_valid))
    assert 0 < z < 1
    kept, result = _fit_from(0.3, x_train, x_valid, 1.0)
    assert result.start_kept_within_noise and result.best_epoch == -1
    assert kept.mean.item() == 0.3
    with torch.no_grad():
        assert result.best_score == pytest.approx(start.log_prob(x_valid).mean().item())
    assert result.best_score < max(result.validation_scores)
    # a lower bar keeps the trained weights
    same, result = _fit_from(0.3, x_train, x_valid, z / 2)
    assert same.mean.item() == trained.mean.item() and not result.start_kept_within_noise


def test_gain_in_standard_errors_is_the_paired_weighted_t_statistic():
    trained = torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    start = torch.zeros(4, dtype=torch.float64)
    d = trained.numpy()
    assert gain_in_standard_errors(trained, start) == pytest.approx(
        d.mean() / (d.std() / math.sqrt(4))
    )
    w = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    p = w.numpy() / w.numpy().sum()
    mean = (p * d).sum()
    se = math.sqrt((p * (d - mean) ** 2).sum() / 4)
    assert gain_in_standard_errors(trained, start, w) == pytest.approx(mean / se)
    assert gain_in_standard_errors(start + 1.0, start) == math.inf  # a gain without spread
    assert gain_in_standard_errors(start, start) == 0.0
    worse = trained.clone()
    worse[0] = -math.inf  # a row the trained weights cannot score
    assert gain_in_standard_errors(worse, start) == -math.inf


# ------------------------------------------------------------------ threads of a fit


def test_torch_threads_at_most_lowers_and_restores_the_setting():
    # The setting comes back after the block, also when the block raises; a limit at or
    # above the current setting changes nothing.
    from sknvp._utils import torch_threads_at_most

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads_at_most(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"), torch_threads_at_most(1):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with torch_threads_at_most(3):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "params, n_rows, threads",
    [
        # 455 rows of 30 features (breast cancer's size): steps of ~25 rows by 128 features
        ({}, 455, 1),
        # steps of 512 rows by 64: torch's own setting
        ({"batch_size": 512, "hidden_layer_sizes": (64, 64), "n_couplings": 2}, 1200, 2),
    ],
)
def test_fits_with_small_steps_train_on_one_thread(monkeypatch, params, n_rows, threads):
    # A second thread gained nothing on small steps and made fits 3.5 to 5 times slower on a
    # machine with another busy process: such fits train on one thread, larger steps keep
    # torch's setting, and the setting is torch's again after the fit.
    import numpy as np

    import sknvp._density as density
    from sknvp import RealNVPDensity

    seen, built = [], []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit_flow(*args, **kwargs)

    build = RealNVPDensity._build_module

    def building(self, *args, **kwargs):  # the mixture's EM, the power transform's choice
        built.append(torch.get_num_threads())
        return build(self, *args, **kwargs)

    monkeypatch.setattr(density, "fit_flow", recording)
    monkeypatch.setattr(RealNVPDensity, "_build_module", building)
    X = np.random.RandomState(0).standard_normal((n_rows, 30 if not params else 4))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        RealNVPDensity(max_iter=2, random_state=0, **params).fit(X)
        assert seen and set(seen) == {threads}
        assert built and set(built) == {threads}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
