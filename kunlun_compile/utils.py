"""Small helpers shared by the stages: graph copies, warnings, shape strings."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Set

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from ._version import __version__


class KunlunCompileWarning(UserWarning):
    """Every warning the backend gives (fallbacks, grad-mode, capture caps)."""


def warn_once(message: str, seen: Optional[Set[str]] = None) -> None:
    """Warn with `message` unless `seen` already holds it.

    `seen` belongs to one backend instance, so one problem gives one warning
    per compiled model rather than one per graph or per call.
    """
    if seen is not None:
        if message in seen:
            return
        seen.add(message)
    warnings.warn(message, KunlunCompileWarning, stacklevel=3)


_RECOMPILE_DEFERRED = contextvars.ContextVar("kunlun_recompile_deferred", default=False)


@contextlib.contextmanager
def recompile_deferred() -> Iterator[None]:
    """Within this block `recompile` does nothing: the pass manager runs a pass inside it and recompiles once
    after the pass (generating a graph's Python code costs ~10 ms; a pass edits its graph many times)."""
    token = _RECOMPILE_DEFERRED.set(True)
    try:
        yield
    finally:
        _RECOMPILE_DEFERRED.reset(token)


def recompile(gm: fx.GraphModule) -> None:
    """`gm.recompile()` after graph edits, unless the caller recompiles later (`recompile_deferred`).  Nothing
    inside a pass may run `gm` or read its code between: only the graph is current there."""
    if not _RECOMPILE_DEFERRED.get():
        gm.recompile()


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy: new graph and nodes, same tensors (no deepcopy of weights)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    # its Python code is generated when first run or read (most copies are snapshots that are never used)
    copy = _LazyGraphModule(gm, graph, gm.__class__.__name__)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


def describe_value(v: Any) -> str:
    """'bf16[s0, 64]' for tensors (symbolic sizes as sympy text), repr otherwise."""
    if isinstance(v, torch.Tensor):
        dt = _SHORT_DTYPES.get(v.dtype, str(v.dtype).replace("torch.", ""))
        return f"{dt}[{', '.join(str(s) for s in v.shape)}]"
    if isinstance(v, torch.SymInt):
        return f"sym {v.node.expr}"
    return type(v).__name__


_SHORT_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "bool",
}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of this package's source: part of every cache key that outlives the process
    (vLLM's compile cache, inductor's cache of a graph our fusion pass touched)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def options_key(options: dict) -> str:
    """sha256 of (package version, source fingerprint, options): what a compiled artifact made by
    this code with these options is known by outside the process."""
    text = json.dumps({"version": __version__, "code": code_fingerprint(), "options": options},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
