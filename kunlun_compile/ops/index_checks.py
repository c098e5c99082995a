"""Range checks of the index inputs of the kunlun:: ops (positions, expert ids).

The kernels never read outside their tensors: an index out of range is masked
and the rows it belongs to come out NaN, so a bad index is visible without the
host reading anything back (which keeps the ops capturable in CUDA graphs).
Eager PyTorch raises IndexError instead; the op wrappers do the same on the
host, before launching, where that costs no device sync (CPU tensors) or where
it is asked for:

    KUNLUN_COMPILE_CHECK_INDICES=1     read once, at import
    with check_indices(True): ...      for a scope (tests, debugging sessions)

A check on a CUDA tensor reads the index range back (one sync per call), and is
skipped while a CUDA graph is being captured (a capture cannot read back; the
warm-up run before it is checked).
"""
from __future__ import annotations

import contextlib

import torch

from ..config import ENV_CHECK_INDICES, env_setting

_checking = env_setting(ENV_CHECK_INDICES)


class IndexOutOfRange(IndexError, ValueError):
    """An index input outside its table: an IndexError as in eager (and a ValueError, as the ops'
    other argument errors are)."""


def checking_indices() -> bool:
    return _checking


@contextlib.contextmanager
def check_indices(enabled: bool):
    """Check index ranges on the host (also on CUDA tensors) inside the block, or not."""
    global _checking
    old, _checking = _checking, enabled
    try:
        yield
    finally:
        _checking = old


def _host_check_wanted(index: torch.Tensor) -> bool:
    if index.device.type == "cpu":
        return True  # no device sync: always, as eager
    if index.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return _checking


def check_index_range(op: str, what: str, index: torch.Tensor, size: int, negative: bool = False) -> None:
    """Raise IndexOutOfRange unless every value of `index` is in [0, size) (when a check is wanted); with
    `negative`, in [-size, size) (x[ids] counts a negative id from the end)."""
    if index.numel() == 0 or not _host_check_wanted(index):
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    low = -size if negative else 0
    if lo < low or hi >= size:
        raise IndexOutOfRange(f"{op}: {what} must be in [{low}, {size}), got values in [{lo}, {hi}]")
