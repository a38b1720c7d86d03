"""Maximum-likelihood training loop for any module with a ``log_prob`` method (torch only)."""

from __future__ import annotations

import copy
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._adam import step_function
from ._backprop import manual_gradient
from ._reduce import mean_and_standard_error

__all__ = ["TrainResult", "batch_slices", "evaluate_log_prob", "fit_flow", "make_adam"]


@dataclass
class TrainResult:
    """What one call of :func:`fit_flow` did."""

    loss_curve: list[float] = field(default_factory=list)
    validation_scores: list[float] = field(default_factory=list)
    n_iter: int = 0
    best_epoch: int = -1
    best_score: float = -math.inf
    converged: bool = False
    diverged: bool = False
    interrupted: bool = False
    skipped_steps: int = 0
    lr_drops: list[int] = field(default_factory=list)
    fit_seconds: float = 0.0
    start_kept_within_noise: bool = False
    start_score: float = -math.inf  # the starting weights' validation score, if any


def batch_slices(n: int, batch_size: int, min_size: int = 2) -> list[slice]:
    """Consecutive slices of at most ``batch_size`` rows; a tail smaller than ``min_size`` is
    merged into the previous slice (batch statistics need two rows)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_size:
        starts.pop()
    ends = starts[1:] + [n]
    return [slice(a, b) for a, b in zip(starts, ends, strict=True)]


@torch.inference_mode()
def _in_batches(log_prob: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    parts = [log_prob(x[s]) for s in batch_slices(len(x), batch_size, 1)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def evaluate_log_prob(module: nn.Module, x: Tensor, batch_size: int = 65536) -> Tensor:
    """``module.log_prob`` in evaluation mode, in batches of at most ``batch_size`` rows."""
    was_training = module.training
    module.eval()
    try:
        return _in_batches(module.log_prob, x, batch_size)
    finally:
        module.train(was_training)


def make_adam(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over ``module``'s parameters, with the fused kernel where this torch build has it
    (several times faster per step for many small tensors), else the default implementation.

    ``weight_decay`` (an L2 penalty, as scikit-learn's ``alpha``) applies to the transform's
    parameters only: the parameters of a trainable base density (``module.base``: a mixture's
    weights, means and precision factors) form a second group without it, since shrinking
    them towards 0 pulls the mixture towards one standard normal rather than regularising.
    """
    base = getattr(module, "base", None)
    own = set() if base is None else {id(p) for p in base.parameters()}
    params = list(module.parameters())
    groups = [{"params": [p for p in params if id(p) not in own], "weight_decay": weight_decay}]
    if own:
        groups.append({"params": [p for p in params if id(p) in own], "weight_decay": 0.0})
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, lr=lr)


def fresh_noise_adder(
    generator: torch.Generator, draw: Callable[[Tensor, torch.Generator], Tensor]
) -> Callable[[Tensor], Tensor]:
    """A minibatch map ``x -> x + draw(x, gen)`` with fresh noise on every call.

    One seed is taken from ``generator`` now; each device the batches live on gets its own
    generator from that seed, so a fit is reproducible on CPU and accelerators alike.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    generators: dict = {}

    def add_noise(x: Tensor) -> Tensor:
        gen = generators.get(x.device)
        if gen is None:
            gen = generators[x.device] = torch.Generator(x.device).manual_seed(seed)
        return x + draw(x, gen)

    return add_noise


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum()


def _params_finite(params: list[Tensor]) -> bool:
    # One check over all parameters: a check per tensor cost more than a small step.
    flat = [p.detach().reshape(-1) for p in params]
    return not flat or bool(torch.isfinite(torch.cat(flat)).all())


def _copy_into(targets: list[Tensor], sources: list[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):  # one call for every tensor (torch 2.1 and later)
        torch._foreach_copy_(targets, sources)
    else:  # pragma: no cover - older torch
        for t, src in zip(targets, sources):
            t.copy_(src)


def _finiteness_check(params: list[Tensor]) -> Callable[[], bool]:
    """:func:`_params_finite` of ``params``, prepared for a check after every epoch.

    The parameters are copied by one ``_foreach_copy_`` into slices of a flat buffer made
    once (parameters are updated in place all through a fit), and the buffer's smallest and
    largest values are checked: both are finite exactly when every value is (``aminmax``
    propagates NaN). On CPU that is a tenth of the time of ``isfinite`` over a fresh
    concatenation, which at the matched size cost a tenth of a one-step epoch of a 455-row
    set (``isfinite`` is not vectorised there: 2 ns a value). Parameters of several dtypes
    or devices fall back to :func:`_params_finite`.
    """
    sources = [p.detach() for p in params]
    if sum(p.numel() for p in sources) == 0:
        return lambda: True
    if len({(p.dtype, p.device) for p in sources}) > 1:
        return lambda: _params_finite(params)
    flat = sources[0].new_empty(sum(p.numel() for p in sources))
    targets = [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in sources]), sources)]

    def check() -> bool:
        _copy_into(targets, sources)
        return bool(torch.isfinite(torch.stack(torch.aminmax(flat))).all())

    return check


def _copy_state(state: dict) -> dict:
    # Clones the tensors: ``copy.deepcopy`` of a state dict goes through Python's generic
    # copying for every tensor and cost about as much as a training step of a small flow.
    snap = OrderedDict(
        (k, v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
        for k, v in state.items()
    )
    snap._metadata = getattr(state, "_metadata", None)  # versions, as load_state_dict reads
    return snap


def _snapshot(module: nn.Module) -> dict:
    """A copy of ``module.state_dict()`` that further training cannot change."""
    return _copy_state(module.state_dict())


class _Snapshots:
    """Snapshots of ``module``'s state for one fit, in two sets of tensors made once.

    ``take()`` returns :func:`_snapshot` of ``module`` written into the set that ``keep``
    does not hold; ``keep(snap)`` marks a snapshot from ``take()`` as the one to preserve
    (the best weights so far). So at most two snapshots are alive, the kept one and the
    latest, and each snapshot after the first two is one ``_foreach_copy_`` into tensors
    that already exist instead of a clone per tensor (about a quarter of the time; the
    snapshot of every epoch cost a twentieth of a one-step epoch). The state dict's tensors
    are looked up once: training and ``load_state_dict`` change them in place, so the same
    tensors hold the state all through a fit. Modules with non-tensor state take a fresh
    :func:`_snapshot` every time.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        state = module.state_dict(keep_vars=True)
        tensor_state = all(isinstance(v, Tensor) for v in state.values())
        self._sources = [v.detach() for v in state.values()] if tensor_state else None
        self._state = state
        self._sets: list[dict] = []
        self._kept: dict | None = None

    def take(self) -> dict:
        if self._sources is None:
            return _snapshot(self._module)
        spare = next((s for s in self._sets if s is not self._kept), None)
        if spare is None:  # the first two snapshots: clones, kept as the two sets
            spare = _copy_state(self._state)
            self._sets.append(spare)
        else:
            _copy_into(list(spare.values()), self._sources)
        return spare

    def keep(self, snap: dict) -> None:
        self._kept = snap

    def restore(self, snap: dict) -> None:
        """Load ``snap`` into the module: one in-place copy for a snapshot of ``take()``
        (``load_state_dict`` walks the module tree and checks every key: a few ms a call)."""
        if self._sources is not None and any(snap is s for s in self._sets):
            with torch.no_grad():
                _copy_into(self._sources, list(snap.values()))
        else:
            self._module.load_state_dict(snap)


def _learning_rate(schedule: str, lr0: float, epoch: int, max_iter: int) -> float:
    if schedule == "cosine":
        return lr0 * 0.5 * (1.0 + math.cos(math.pi * epoch / max(max_iter, 1)))
    return lr0


def _flushes_denormals() -> bool:
    """Whether this thread's CPU flushes subnormal results to zero (half the smallest normal
    float32 comes out as 0)."""
    tiny = torch.tensor(torch.finfo(torch.float32).tiny, dtype=torch.float32)
    return bool(tiny / 2 == 0)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Within the block, this thread's CPU treats subnormal floats as zero
    (``torch.set_flush_denormal``), as it was before afterwards.

    Subnormal numbers cost a CPU many times the time of normal ones, and long fits make them
    (:func:`_flushing_step`): the benchmark's checkerboard defaults fit in 18 CPU s with
    this mode against 101 s without (one thread). The mode is per thread: torch's worker
    threads keep theirs, which is what the periodic flush of :func:`_flushing_step` is for.
    Does nothing where the CPU has no such mode.
    """
    turn_on = not _flushes_denormals()
    # A thread starts with the mode of the thread that starts it: have torch's worker
    # threads (made on the first parallel operation) started first, with the caller's mode,
    # or they would keep flush-to-zero for the rest of the process.
    if turn_on and torch.get_num_threads() > 1:
        torch.zeros(1 << 16).add_(1.0)
    turned_on = turn_on and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if turned_on:
            torch.set_flush_denormal(False)


def _flushing_denormals(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with flush_denormals():
            return fn(*args, **kwargs)

    return wrapper


# Training steps between two flushes of tiny numbers (_flushing_step).
_FLUSH_EVERY = 32


def _zero_tiny_(tensors, power: float = 1.0) -> None:
    """Zero, in place, the entries of each floating CPU tensor of ``tensors`` whose magnitude
    is below the smallest normal float to the power ``power`` (1: the subnormal numbers;
    1/2: also the numbers whose squares underflow). Types of fewer than 32 bits get the
    subnormal bound whatever ``power`` is (the square root of float16's smallest normal
    number is 0.0078, a weight)."""
    with torch.no_grad():
        for t in tensors:
            if t.dim() and t.is_floating_point() and t.device.type == "cpu":
                info = torch.finfo(t.dtype)
                bound = info.tiny ** power if info.bits >= 32 else info.tiny
                t.masked_fill_(t.abs() < bound, 0.0)


def _flushing_step(step, module, optimizer, every: int = _FLUSH_EVERY):
    """``step``, and every ``every`` calls the parameters and Adam's first moments set to zero
    where their magnitude is below the square root of the smallest normal float (1.1e-19 in
    float32, 1.5e-154 in float64), and the other optimizer state where it is subnormal.

    With an L2 penalty Adam shrinks the weights of units that get no gradient from the data
    (dead ReLUs) geometrically, and the moments of such weights decay the same way: after
    enough steps they fall below the smallest normal float. CPUs compute with subnormal
    numbers many times slower: a default fit of the benchmark's checkerboard had 60,000
    subnormal weights by epoch 120 of 148 and its epochs took 1.45 s instead of 0.11 s
    (101 CPU s for the fit).

    The calling thread's flush-to-zero mode (:func:`flush_denormals`) covers its own
    arithmetic only. Torch's worker threads meet subnormal numbers before the weights are
    subnormal themselves: in the squares Adam takes of gradients (the L2 gradient of a
    weight below the square root is smaller still) and in products with such weights and
    first moments. Hence their higher bound; second moments are squares, legitimately as
    small as a small gradient squared, and are zeroed only where subnormal. With two threads
    the checkerboard default fit's epochs rose from 0.10 to 0.19 s after epoch 60 when only
    subnormal numbers were zeroed, and stay flat with these bounds.

    Nothing a float can resolve moves: an Adam step made from a first moment below the bound
    is at most about 1e-10 times the learning rate in float32 (Adam's eps is 1e-8), and a
    weight below it adds less than 1.1e-19 times an activation to sums of normal-sized
    terms. The benchmark's nine default fits (seed 0, one thread) take the same epochs to
    the same held-out scores as with subnormal numbers alone zeroed (checkerboard's within
    3e-9). A fit's path can still change, as with any rounding difference: with the second
    moments under the same bound, circles' fit took 60 epochs instead of 84.
    """
    count = 0

    def flushing_step() -> None:
        nonlocal count
        step()
        count += 1
        if count % every == 0:
            _zero_tiny_(module.parameters(), power=0.5)
            states = [
                (key, v) for state in optimizer.state.values() for key, v in state.items()
                if torch.is_tensor(v)
            ]
            _zero_tiny_((v for key, v in states if key == "exp_avg"), power=0.5)
            _zero_tiny_(v for key, v in states if key != "exp_avg")

    return flushing_step


def _train_epoch(
    module, optimizer, x, w, batch_size, generator, transform_batch, manual=None, step=None
) -> tuple[float, int]:
    if not module.training:  # each call of train() walks the whole module tree
        module.train()
    slices = batch_slices(len(x), batch_size)
    # One batch of every row: its loss and gradient do not depend on the rows' order, so it
    # is not shuffled (no permutation and no copy of the rows each epoch).
    perm = torch.randperm(len(x), generator=generator).to(x.device) if len(slices) > 1 else None
    total, weight_sum, skipped = 0.0, 0.0, 0
    step = optimizer.step if step is None else step
    for s in slices:
        if perm is None:
            xb, wb = x, w
        else:
            idx = perm[s]
            xb, wb = x[idx], None if w is None else w[idx]
        if transform_batch is not None:
            xb = transform_batch(xb)
        if manual is not None:  # loss and gradients in one pass, no autograd graph
            loss = manual.loss_and_grad(xb, wb)
        else:
            loss = -_weighted_mean(module.log_prob(xb), wb)
        if not torch.isfinite(loss):
            skipped += 1
            continue
        if manual is None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        step()
        bw = float(len(xb) if wb is None else wb.sum())
        total += float(loss.detach()) * bw
        weight_sum += bw
    mean_loss = total / weight_sum if weight_sum > 0 else math.nan
    return mean_loss, skipped


def _validation_score(module, x, w) -> float:
    return float(_weighted_mean(evaluate_log_prob(module, x), w))


def _initial_rows(module, manual, x) -> Tensor:
    """Each row's log-likelihood under the weights training starts from; for a fresh flow
    (every coupling still the identity) through its fixed layers and base only: the same
    numbers without the conditioners' work."""
    if manual is None or not manual.couplings_are_identity():
        return evaluate_log_prob(module, x)
    return _in_batches(manual.log_prob_without_couplings, x, 65536)


def _initial_score(module, manual, x, w) -> float:
    """:func:`_validation_score` of the weights training starts from (:func:`_initial_rows`)."""
    return float(_weighted_mean(_initial_rows(module, manual, x), w))


def gain_in_standard_errors(trained: Tensor, start: Tensor, w: Tensor | None = None) -> float:
    """Mean of the per-row differences ``trained - start`` (weighted by ``w``) over its
    standard error: ``inf`` for a positive mean with no spread, and ``-inf`` where the mean
    is not finite (a row the trained weights score at -inf, or a spike at +inf)."""
    d = (trained - start).double()
    w = torch.ones_like(d) if w is None else w.to(d) * (d.shape[0] / w.sum())
    mean, se = mean_and_standard_error(d, w)
    if not math.isfinite(mean):
        return -math.inf
    if se == 0.0:
        return math.inf if mean > 0 else (0.0 if mean == 0 else -math.inf)
    return mean / se


def _keep_start_unless_clearly_better(
    module, initial, start_rows, snapshots, x, w, min_gain_se, result
) -> None:
    """Restore ``initial`` (whose rows of ``x`` scored ``start_rows``) unless the kept
    weights (loaded) beat it on the validation rows ``x`` by ``min_gain_se`` standard errors
    (:func:`gain_in_standard_errors`)."""
    trained = evaluate_log_prob(module, x)
    if gain_in_standard_errors(trained, start_rows, w) >= min_gain_se:
        return
    snapshots.restore(initial)
    result.best_epoch = -1
    result.best_score = result.start_score
    result.start_kept_within_noise = True


def _keep_better_on_training_data(
    module, candidate, x, w, snapshots=None, candidate_score=None
) -> bool:
    """Keep the final weights unless ``candidate`` fits the training data better (a run whose
    last epochs blew up without producing non-finite numbers); return whether ``candidate``
    was restored. ``snapshots``, if given, is the fit's :class:`_Snapshots` that holds
    ``candidate`` as its kept snapshot; ``candidate_score``, if given, is the candidate's
    exact training score (it is not measured again)."""
    if snapshots is None:
        snapshots = _Snapshots(module)
        snapshots.keep(candidate)
    if candidate_score is not None:
        final = _validation_score(module, x, w)
        if math.isfinite(final) and not candidate_score > final:
            return False
        snapshots.restore(candidate)
        return True
    final_state = snapshots.take()
    final = _validation_score(module, x, w)
    snapshots.restore(candidate)
    best = _validation_score(module, x, w)
    if math.isfinite(final) and not best > final:
        snapshots.restore(final_state)
        return False
    return True


@_flushing_denormals
def fit_flow(
    module: nn.Module,
    x_train: Tensor,
    *,
    x_valid: Tensor | None = None,
    w_train: Tensor | None = None,
    w_valid: Tensor | None = None,
    max_iter: int = 100,
    batch_size: int = 256,
    learning_rate_init: float = 1e-3,
    learning_rate: str = "cosine",
    alpha: float = 0.0,
    tol: float = 1e-4,
    n_iter_no_change: int = 10,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    verbose: int = 0,
    print_fn: Callable[[str], None] = print,
    transform_batch: Callable[[Tensor], Tensor] | None = None,
    keep_better: bool = True,
    plateau_factor: float = 0.1,
    backprop: str = "auto",
    min_gain_se: float = 0.0,
) -> tuple[TrainResult, torch.optim.Optimizer]:
    """Train ``module`` by minimising the mean negative log-likelihood with Adam.

    Stops after ``max_iter`` epochs, or when the monitored quantity (the validation
    log-likelihood if ``x_valid`` is given, else the training loss) has not improved by ``tol``
    for ``n_iter_no_change`` epochs while the learning rate is at most ``plateau_factor`` times
    ``learning_rate_init``. A plateau at a higher learning rate is taken for noise of the
    step size rather than convergence: the best weights so far are restored, every later
    learning rate is multiplied by ``plateau_factor`` and the count starts again
    (``plateau_factor=1`` turns this off: the first plateau stops). With ``x_valid`` the
    weights of the best validation epoch are restored at the end; without, the final weights
    are kept unless those of the best training epoch fit the training data better (when one
    untransformed batch holds every training row, an epoch's loss is the exact training score
    of the weights it started from and no separate pass measures them).
    A batch whose loss is not finite is skipped; an epoch that leaves non-finite weights or
    loss ends training with the best finite weights restored (``diverged``). A
    ``KeyboardInterrupt`` also restores the best weights (``interrupted``).

    ``transform_batch``, if given, maps each training minibatch before the loss (e.g. adds
    fresh dequantisation noise); validation data are used as given.

    ``min_gain_se > 0`` (with ``x_valid``) keeps the best epoch only if it beats the weights
    training started from by at least that many standard errors of the per-row difference
    of their validation log-likelihoods (paired, so what both share cancels); otherwise the
    starting weights are restored (``start_kept_within_noise``). The best of many epochs'
    scores is biased upwards against the start's one score, so a start that is already a
    good model (a fitted Gaussian mixture) loses to noise without it.

    ``keep_better=False`` (one-pass updates such as ``partial_fit``) always keeps the final
    finite weights when there is no validation set: every update counts, even one whose pass
    measured a higher loss than the weights it started from.

    ``backprop="auto"`` computes the gradients of flows that :mod:`sknvp._backprop` supports
    (vector Real-NVP flows without batch norm) by its hand-derived chain rule (a quarter to
    two fifths less time per epoch at the benchmark's matched size), and of any other module
    by autograd;
    ``"autograd"`` always uses autograd. Both give the same gradients up to rounding.

    Returns the :class:`TrainResult` and the optimizer (to resume training later).
    """
    if not 0 < plateau_factor <= 1:
        raise ValueError(f"plateau_factor must be in (0, 1], got {plateau_factor!r}.")
    if backprop not in ("auto", "autograd"):
        raise ValueError(f"backprop must be 'auto' or 'autograd', got {backprop!r}.")
    manual = manual_gradient(module) if backprop == "auto" else None
    params_finite = _finiteness_check(list(module.parameters()))
    snapshots = _Snapshots(module)
    module.train()
    if optimizer is None:
        optimizer = make_adam(module, learning_rate_init, alpha)
    step, release_step = step_function(optimizer)
    step = _flushing_step(step, module, optimizer)
    result = TrainResult()
    start = time.perf_counter()
    monitor_valid = x_valid is not None and len(x_valid) > 0
    # One batch of every training row, untransformed, through a flow without batch norm (what
    # the hand-derived gradient supports): an epoch's loss is then the exact training loss of
    # the weights it started from, those of the epoch before, so no pass of their own is needed
    # to score the initial weights or the kept ones.
    exact_epoch_loss = (
        keep_better and not monitor_valid and manual is not None and transform_batch is None
        and len(batch_slices(len(x_train), batch_size)) == 1
    )
    best_state = snapshots.take()
    snapshots.keep(best_state)
    initial = _snapshot(module) if monitor_valid and min_gain_se > 0 else None
    if monitor_valid:
        start_rows = _initial_rows(module, manual, x_valid)
        result.best_score = result.start_score = float(_weighted_mean(start_rows, w_valid))
    elif keep_better and transform_batch is None and not exact_epoch_loss:
        # Without validation rows the initial weights compete on their exact training loss
        # (an epoch's loss is measured while its steps change the weights, so the first
        # epoch's loss does not stand for the initial weights): a learning rate that ruins
        # the first step, after which the loss only falls, would otherwise keep the ruin.
        # (Batches transformed in training, e.g. noisy, are not scored like the raw rows.)
        result.best_score = _initial_score(module, manual, x_train, w_train)
    if not math.isfinite(result.best_score):
        result.best_score = -math.inf
    no_improvement = 0
    lr_factor = 1.0
    try:
        for epoch in range(max_iter):
            lr = lr_factor * _learning_rate(learning_rate, learning_rate_init, epoch, max_iter)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Without validation the epoch's loss was measured on the weights *during* the
            # epoch, so it is paired with the weights at the epoch's start. (A snapshot not
            # kept is overwritten by the next one.)
            at_start = (
                snapshots.take() if keep_better and not monitor_valid else None
            )
            loss, skipped = _train_epoch(
                module, optimizer, x_train, w_train, batch_size, generator, transform_batch,
                manual, step,
            )
            result.skipped_steps += skipped
            if not (math.isfinite(loss) and params_finite()):
                result.diverged = True
                break
            result.loss_curve.append(loss)
            result.n_iter = epoch + 1
            score = _validation_score(module, x_valid, w_valid) if monitor_valid else -loss
            if monitor_valid:
                result.validation_scores.append(score)
            if not math.isfinite(score):
                result.diverged = True
                break
            no_improvement = 0 if score > result.best_score + tol else no_improvement + 1
            if score > result.best_score:
                result.best_score = score
                result.best_epoch = epoch - 1 if exact_epoch_loss else epoch
                best_state = at_start or snapshots.take()
                snapshots.keep(best_state)
            if verbose:
                extra = f", validation score = {score:.5f}" if monitor_valid else ""
                print_fn(f"Epoch {epoch + 1}, loss = {loss:.5f}{extra}")
            if no_improvement >= n_iter_no_change:
                if lr <= plateau_factor * learning_rate_init * (1 + 1e-9):
                    result.converged = True
                    break
                # Still a large step size: restart from the best weights with smaller steps.
                snapshots.restore(best_state)
                lr_factor *= plateau_factor
                no_improvement = 0
                result.lr_drops.append(epoch)
                if verbose:
                    print_fn(
                        f"Epoch {epoch + 1}: no improvement for {n_iter_no_change} epochs at "
                        f"learning rate {lr:.3g}; best weights restored, learning rate x "
                        f"{plateau_factor:g}"
                    )
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        release_step()
    if monitor_valid or result.diverged or result.interrupted:
        snapshots.restore(best_state)
        if initial is not None and result.best_epoch >= 0:
            _keep_start_unless_clearly_better(
                module, initial, start_rows, snapshots, x_valid, w_valid, min_gain_se, result
            )
    elif keep_better:
        kept = _keep_better_on_training_data(
            module, best_state, x_train, w_train, snapshots,
            candidate_score=result.best_score if exact_epoch_loss else None,
        )
        if not kept and (result.best_epoch < 0 or exact_epoch_loss):  # the final weights
            result.best_epoch = result.n_iter - 1
    module.eval()
    result.fit_seconds = time.perf_counter() - start
    return result, optimizer
