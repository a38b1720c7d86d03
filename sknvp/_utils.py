"""Seeds, devices, dtypes and array/tensor conversion for the estimator layer."""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = [
    "TORCH_DTYPES",
    "cast_module",
    "derive_seed",
    "map_batches",
    "resolve_device",
    "torch_threads_at_most",
]

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def derive_seed(rng: np.random.RandomState) -> int:
    """Draw an int seed for torch from a numpy ``RandomState``."""
    return int(rng.randint(np.iinfo(np.int32).max))


_CASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CASTS_LOCK = threading.Lock()


def _tensor_versions(module: nn.Module) -> tuple:
    # Any in-place edit of a parameter or buffer bumps its version; a replaced tensor has a new
    # address. Either makes a cached copy stale.
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


def cast_module(
    module: nn.Module, dtype: torch.dtype, prepare: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """``module`` in floating type ``dtype``: itself if it already is (and there is nothing to
    ``prepare``), else a cached copy.

    ``prepare`` edits the copy in place before the cast (the same function object each time,
    or the cache misses). Copying a flow costs milliseconds, more than scoring a few rows, so
    the copy is kept (in a weak map, so it goes with ``module``) until a parameter or buffer of
    ``module`` changes. ``module`` itself is never modified.
    """
    floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if prepare is None and all(t.dtype == dtype for t in floats):
        return module
    key = (_tensor_versions(module), dtype, prepare)
    with _CASTS_LOCK:
        cached = _CASTS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    converted = copy.deepcopy(module)
    if prepare is not None:
        with torch.no_grad():
            prepare(converted)
    converted = converted.to(dtype)
    with _CASTS_LOCK:
        _CASTS[module] = (key, converted)
    return converted


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` parameter into an available ``torch.device``.

    ``"auto"`` picks CUDA when present, then Apple's MPS, else the CPU. An unknown or
    unavailable device raises ``ValueError`` naming what is available.
    """
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(
                f"device={str(device)!r} is not available: this machine has {count} CUDA "
                "device(s). Use device='cpu' or device='auto'."
            )
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(f"device={str(device)!r} is not available. Use 'cpu' or 'auto'.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'mps'.")
    return dev


@contextmanager
def torch_threads_at_most(n: int) -> Iterator[None]:
    """Within the block, torch's intra-op work runs on at most ``n`` threads; the setting it
    found is put back afterwards (also when the block raises). Does nothing where torch
    already uses ``n`` threads or fewer."""
    before = torch.get_num_threads()
    if before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _row_chunks(n: int, batch_rows: int) -> Iterator[slice]:
    for start in range(0, n, batch_rows):
        yield slice(start, min(start + batch_rows, n))


def map_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    X: np.ndarray,
    out_shape: tuple[int, ...],
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_rows: int,
    shift_in: np.ndarray | None = None,
    shift_out: np.ndarray | None = None,
) -> np.ndarray:
    """Apply ``fn`` to ``X`` in row chunks, writing into one preallocated float64 array.

    ``shift_in`` is subtracted from each chunk (in float64, before the cast to ``dtype``) and
    ``shift_out`` added to each result (in float64). Peak memory is the input, the output and
    one chunk of activations, whatever ``len(X)``.
    """
    out = np.empty((len(X), *out_shape), dtype=np.float64)
    with torch.inference_mode():
        for s in _row_chunks(len(X), batch_rows):
            chunk = X[s] if shift_in is None else X[s] - shift_in
            x = torch.as_tensor(np.ascontiguousarray(chunk), device=device).to(dtype)
            out[s] = fn(x).to("cpu", torch.float64).numpy()
            if shift_out is not None:
                out[s] += shift_out
    return out
