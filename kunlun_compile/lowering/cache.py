"""Generated kernels: registry, on-disk cache, loading and launching.

A kernel is known by its key (a hash of its KIR).  `register` records the KIR
in memory and on disk (`<key>.json`), so a graph that names the key can run in
a later process; `kernel_for` generates the Triton source once per key and
codegen version (`<key>_v<N>.py`, written atomically), imports it and wraps it
in a launcher.  Triton caches the compiled binaries by source, so a warm disk
cache skips both code generation and compilation.

Directory: $KUNLUN_COMPILE_CACHE_DIR, else ~/.cache/kunlun_compile, subfolder
`pointwise/` (a temporary folder if that is not writable).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import triton

from ..ops.triton_kernel import Kernel
from .codegen import CODEGEN_VERSION, coalesce, generate
from .kir import KernelIR

ENV_CACHE_DIR = "KUNLUN_COMPILE_CACHE_DIR"
BLOCK = 1024
NUM_WARPS = 4
_INT32_LIMIT = 2**31 - 1

_registry: Dict[str, KernelIR] = {}
_kernels: Dict[str, "GeneratedKernel"] = {}
stats = collections.Counter()  # generated / read_from_disk / kir_from_disk


def cache_dir() -> Path:
    root = Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "kunlun_compile") / "pointwise"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".writable"
        probe.touch()
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"kunlun_compile_{os.getuid()}" / "pointwise"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def register(kir: KernelIR) -> str:
    key = kir.key
    _registry.setdefault(key, kir)
    path = cache_dir() / f"{key}.json"
    if not path.exists():
        _write_atomic(path, json.dumps(kir.to_json()))
    return key


def kir_for(key: str) -> KernelIR:
    if key not in _registry:
        path = cache_dir() / f"{key}.json"
        if not path.exists():
            raise KeyError(f"kunlun::pointwise: unknown generated kernel {key!r} (not compiled in this process and "
                           f"not in the cache at {path.parent}); recompile the model")
        _registry[key] = KernelIR.from_json(json.loads(path.read_text()))
        stats["kir_from_disk"] += 1
    return _registry[key]


def source_path(key: str) -> Path:
    return cache_dir() / f"{key}_v{CODEGEN_VERSION}.py"


def kernel_for(key: str) -> "GeneratedKernel":
    k = _kernels.get(key)
    if k is None:
        kir = kir_for(key)
        path = source_path(key)
        if path.exists():
            stats["read_from_disk"] += 1
        else:
            _write_atomic(path, generate(kir))
            stats["generated"] += 1
        spec = importlib.util.spec_from_file_location(f"kunlun_compile_generated.{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        k = _kernels[key] = GeneratedKernel(kir, module, path)
    return k


class GeneratedKernel:
    """Launches one generated kernel: outputs allocated contiguous, inputs read through their strides."""

    def __init__(self, kir: KernelIR, module, path: Path):
        self.kir, self.path = kir, path
        self.rank = max(kir.rank, 1)
        self._cuda = Kernel(module.kernel_cuda)
        self._portable = Kernel(module.kernel_portable)
        self._plans: Dict[tuple, tuple] = {}

    def _plan(self, inputs: Sequence[torch.Tensor], shape: Tuple[int, ...]) -> tuple:
        sig = (shape, tuple((x.shape, x.stride()) for x in inputs))
        plan = self._plans.get(sig)
        if plan is None:
            strides = [_broadcast_strides(x, self.rank) for x in inputs]
            padded = (1,) * (self.rank - len(shape)) + tuple(shape)
            sizes, sts = coalesce(padded, strides)
            numel = 1
            for s in padded:
                numel *= s
            reach = max([numel] + [sum((n - 1) * abs(st) for n, st in zip(sizes, s)) for s in sts])
            rank = len(sizes)
            full_sizes = [1] * (self.rank - rank) + sizes
            full_strides = [[0] * (self.rank - rank) + s for s in sts]
            args = full_sizes[1:] + [st for s in full_strides for st in s]
            plan = self._plans[sig] = (numel, args, rank, reach > _INT32_LIMIT)
            if len(self._plans) > 256:  # many layouts: keep the newest
                self._plans.pop(next(iter(self._plans)))
        return plan

    def __call__(self, inputs: Sequence[torch.Tensor], shape: Sequence[int]) -> List[torch.Tensor]:
        shape = tuple(int(s) for s in shape)
        device = inputs[0].device
        outs = [torch.empty(shape, dtype=d, device=device) for d in self.kir.outputs]
        numel, args, rank, index64 = self._plan(inputs, shape)
        if numel == 0:
            return outs
        fn = (self._cuda if device.type == "cuda" else self._portable).on(device)
        fn[(triton.cdiv(numel, BLOCK),)](*inputs, *outs, numel, *args, RANK=rank, INDEX64=index64, BLOCK=BLOCK,
                                         num_warps=NUM_WARPS)
        return outs


def _broadcast_strides(x: torch.Tensor, rank: int) -> List[int]:
    """x's strides over the (right-aligned, left-padded to `rank`) iteration shape: 0 where x is broadcast."""
    return [0] * (rank - x.dim()) + [x.stride(d) if x.shape[d] != 1 else 0 for d in range(x.dim())]
