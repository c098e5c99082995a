"""`kunlun-compile bench`: eager, inductor and this backend on one target, side by side.

Per variant: median time per call, and from a profile of a few calls the work per call split into
fused kernels (the kunlun:: ops), generated element-wise kernels, ATen, and host overhead (the
wall time no kernel accounts for).  The profiler slows calls down, so the split is the profile's
proportions applied to the unprofiled time per call (the four parts add up to it).  On CUDA the split is
over GPU kernels; on the CPU over the top-level operator calls of the profile (each one a "launch").
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch

from ..triton_kernel import FUSED_KERNEL_NAMES
from .targets import Target, compare_outputs, run_eager

CLASSES = ("fused", "generated", "aten")
_OP_PREFIXES = ("aten::", "kunlun::", "kunlun_models::")


def _kernel_class(name: str) -> str:
    if name.startswith(("kernel_cuda", "kernel_portable")):
        return "generated"
    if name in FUSED_KERNEL_NAMES:
        return "fused"
    return "aten"


def _op_class(name: str) -> str:
    if name == "kunlun::pointwise":
        return "generated"
    return "fused" if name.startswith("kunlun::") else "aten"  # a model's own ops count with ATen


def _sync(on_cuda: bool) -> None:
    if on_cuda:
        torch.cuda.synchronize()


def _split(fn: Callable, args, calls: int, on_cuda: bool) -> Dict[str, Any]:
    """Launches and microseconds per call by class, from a profile of `calls` calls."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        _sync(on_cuda)
        wall_us = (time.perf_counter() - t0) * 1e6 / calls
    launches = dict.fromkeys(CLASSES, 0)
    us = dict.fromkeys(CLASSES, 0.0)
    for e in prof.events():
        if on_cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            cls, t = _kernel_class(e.name), e.device_time_total
        else:
            if not e.name.startswith(_OP_PREFIXES) or _has_op_ancestor(e):
                continue
            cls, t = _op_class(e.name), e.cpu_time_total
        launches[cls] += 1
        us[cls] += t
    us = {k: v / calls for k, v in us.items()}
    us["host"] = max(0.0, wall_us - sum(us.values()))
    return {"launches": {k: v / calls for k, v in launches.items()}, "us": us, "profiled_us_per_call": wall_us}


def _has_op_ancestor(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(_OP_PREFIXES):
            return True
        p = p.cpu_parent
    return False


def bench(target: Target, variants: Dict[str, Callable[[], Callable]], reps: int = 20,
          profile_calls: int = 3) -> Dict[str, Any]:
    """`variants`: label -> a function building the callable (compiling counts as warm-up)."""
    if reps < 1 or profile_calls < 1:
        raise ValueError(f"bench: reps and profile_calls must be >= 1, got {reps} and {profile_calls}")
    args = target.inputs
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    rows: List[Dict[str, Any]] = []
    with torch.inference_mode():
        want = run_eager(target)
        for label, make in variants.items():
            row: Dict[str, Any] = {"variant": label}
            try:
                torch._dynamo.reset()
                t0 = time.perf_counter()
                fn = make()
                out = fn(*args)
                _sync(on_cuda)
                row["first_call_s"] = time.perf_counter() - t0
                # the check compares every call, the replays included: the first call is a warm-up that
                # runs the graph as plain code, and a runtime fault shows only from the captures on
                cmps = [compare_outputs(out, want)] + [compare_outputs(fn(*args), want) for _ in range(3)]
                times = []
                for _ in range(reps):
                    _sync(on_cuda)
                    t = time.perf_counter()
                    fn(*args)
                    _sync(on_cuda)
                    times.append((time.perf_counter() - t) * 1e3)
                row["ms_per_call"] = statistics.median(times)
                cmps.append(compare_outputs(fn(*args), want))
                worst = max(cmps, key=lambda c: (not c.ok, c.rel_err))
                row["matches_eager"], row["rel_err"] = worst.ok, worst.rel_err
                row["calls_checked"] = len(cmps)
                split = _split(fn, args, profile_calls, on_cuda)
                # the profiler slows every call down: its proportions, applied to the unprofiled time
                scale = row["ms_per_call"] * 1e3 / max(sum(split["us"].values()), 1e-9)
                split["us"] = {k: v * scale for k, v in split["us"].items()}
                row.update(split)
            except Exception as e:  # noqa: BLE001 - a variant that fails (no C++ compiler for inductor) is reported
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    return {"target": target.name, "device": torch.cuda.get_device_name() if on_cuda else "cpu",
            "torch": torch.__version__, "reps": reps, "rows": rows}
