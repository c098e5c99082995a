"""Traced patterns on disk, so a new process does not trace every rule again.

Tracing a rule's search function (make_fx + functionalization + our decompositions) costs 10-50 ms,
and a model that meets many rule variants pays it dozens of times in each fresh process — most of
the passes' compile time (benchmarks/NOTES.md v18).  The traced ATen graph is stored as JSON with
`capture/graph_io.py`, which rebuilds it exactly and resolves only its allow-list of callables, so a
cache entry is data, never code.

Key: sha256 over the package's Python sources and torch's version (the source version: any edit of a
rule, an op schema, the decompositions or the tracer makes every entry stale), the rule, the dtype,
the example inputs' shapes and dtypes, and the thread's dispatch state (`dispatch_state`: a composite op
decomposes differently in inference mode or below autograd, so one state's pattern can miss another
state's graph).  Entry `patterns/<source version>/<key>_p<F>.json` = {"format",
"sha256" (over the graph), "graph"}; one that fails its hash or the allow-list is a miss: traced again
and overwritten, with one warning.  The newest VERSIONS_KEPT source versions stay on disk.  Root: the
generated-kernel cache's (lowering/cache.py: owner-checked fallback).

Before a pattern is built, `Summary` (its ops and its anchor's neighbourhood, read off the stored graph)
tells whether the graph can hold a match at all; most rule variants fail that check and cost a file read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from ..capture import graph_io
from ..config import ENV_PATTERN_CACHE, env_setting
from ..lowering import cache as kernel_cache

ENTRY_FORMAT = 1
_PACKAGE = Path(__file__).resolve().parents[1]
stats = {"traced": 0, "loaded": 0, "rejected": 0}
_lock = threading.Lock()


def _hash_sources() -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# Hashed when the package is imported, not at first use: a process whose code was loaded before a source
# edit must not store its patterns under the edited sources' version.
_SOURCE_VERSION = _hash_sources()


# Dispatch keys that do not change what a pattern trace records: Python modes' bookkeeping, and the Python
# dispatcher, which pattern_engine.trace_pattern always turns on (as AOT autograd does for the model's graph).
_NEUTRAL_KEYS = frozenset({"Python", "PythonTLSSnapshot", "PythonDispatcher", "BackendSelect"})


def _key_names(keys: "torch._C.DispatchKeySet") -> list:
    inside = str(keys).partition("(")[2].rstrip(")")
    return sorted(k for k in (k.strip() for k in inside.split(",")) if k and k not in _NEUTRAL_KEYS)


def dispatch_state() -> str:
    """The thread's dispatch keys a trace depends on (+included, -excluded).  A composite op's ATen form
    depends on them: `one_hot` gains range asserts under the Python dispatcher, `rms_norm` in bf16 takes
    another path below autograd (inference mode, vLLM's compile).  Part of every key, so a pattern traced in
    one state is never matched against a graph traced in another (NOTES v37)."""
    return " ".join([*("+" + k for k in _key_names(torch._C._dispatch_tls_local_include_set())),
                     *("-" + k for k in _key_names(torch._C._dispatch_tls_local_exclude_set()))])


def entry_key(rule_id: str, dtype: torch.dtype, examples: Sequence[torch.Tensor]) -> str:
    shapes = [(tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else repr(t) for t in examples]
    text = json.dumps([_SOURCE_VERSION, rule_id, str(dtype), shapes, dispatch_state()])
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _digest(graph: dict) -> str:
    return hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()


VERSIONS_KEPT = 4  # source versions whose entries stay on disk (the newest by use)


@functools.lru_cache(maxsize=None)
def _folder(root: Path) -> Optional[Path]:
    """`root/<source version>/`, created once a process; older versions beyond VERSIONS_KEPT removed."""
    folder = root / _SOURCE_VERSION[:16]
    try:
        folder.mkdir(exist_ok=True)
        os.utime(folder)
        versions = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for old in versions[VERSIONS_KEPT:]:
            shutil.rmtree(old, ignore_errors=True)
    except OSError:
        return None
    return folder


def _path(key: str) -> Optional[Path]:
    root = kernel_cache.cache_subdir("patterns")
    folder = _folder(root) if root is not None else None
    return None if folder is None else folder / f"{key}_p{ENTRY_FORMAT}.json"


def op_key(target) -> str:
    """"namespace::name.overload" for an op, "py:name" for a Python function (getitem)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    return f"py:{getattr(target, '__name__', target)}"


def _data_key(target) -> str:
    if isinstance(target, dict) and "op" in target:
        return f"{target['op']}.{target['overload']}"
    return f"py:{target.get('name') if isinstance(target, dict) else target}"


ANCHOR_DEPTH = 16


class Summary:
    """What a pattern needs of a graph, read off its traced graph without building the pattern: every op
    key it calls, and the first output's neighbourhood (op and, for arguments computed inside the
    pattern, their ops, ANCHOR_DEPTH levels deep).  Both are necessary conditions of a match."""

    def __init__(self, data: dict):
        nodes = {d["name"]: d for d in data["nodes"]}
        self.ops = frozenset(_data_key(d["target"]) for d in data["nodes"] if d["op"] == "call_function")
        output = next(d for d in data["nodes"] if d["op"] == "output")
        first = _first_node(output["args"])
        self.anchor = _signature(nodes, first, ANCHOR_DEPTH, {}) if first else None


def _first_node(value):
    if isinstance(value, dict):
        if "node" in value:
            return value["node"]
        for v in value.values():
            found = _first_node(v)
            if found:
                return found
    if isinstance(value, list):
        for v in value:
            found = _first_node(v)
            if found:
                return found
    return None


def _signature(nodes: dict, name: str, depth: int, memo: dict):
    """(op key, ((position, signature), ...)) of a pattern node, a position being an argument index or
    (index, element) inside a list argument (`cat`'s tensors); None for an input (matches anything).
    Memoised per (node, depth): a pattern is a DAG, and its unfolding into a tree shares every subtree."""
    if (name, depth) not in memo:
        memo[name, depth] = _unmemoised_signature(nodes, name, depth, memo)
    return memo[name, depth]


def _unmemoised_signature(nodes: dict, name: str, depth: int, memo: dict):
    d = nodes[name]
    if d["op"] != "call_function":
        return None
    args = d["args"].get("tuple", []) if isinstance(d["args"], dict) else []
    positions = []
    for i, a in enumerate(args):
        if isinstance(a, dict) and "node" in a:
            positions.append((i, a["node"]))
        elif isinstance(a, dict) and isinstance(a.get("list", a.get("tuple")), list):
            positions += [((i, j), x["node"]) for j, x in enumerate(a.get("list", a.get("tuple")))
                          if isinstance(x, dict) and "node" in x]
    subs = [(pos, _signature(nodes, n, depth - 1, memo)) for pos, n in positions] if depth > 1 else []
    return _data_key(d["target"]), tuple((pos, sub) for pos, sub in subs if sub is not None)


def _load(path: Path) -> Optional[dict]:
    try:
        entry = json.loads(path.read_text())
        if entry.get("format") != ENTRY_FORMAT or entry.get("sha256") != _digest(entry["graph"]):
            raise ValueError("hash mismatch")
        graph_io.check_graph_data(entry["graph"], {})  # the allow-list, before anything is used
        return entry["graph"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        stats["rejected"] += 1
        kernel_cache.warn_once(f"pattern:{path}", f"kunlun_compile: pattern cache entry {path} rejected "
                                                  f"({type(e).__name__}: {e}); traced again")
        return None


def _recordable(gm: fx.GraphModule) -> Optional[dict]:
    """The graph as data, or None for one that cannot be stored (tensor constants, unrecordable targets)."""
    try:
        data, tensors = graph_io.graph_to_data(gm)
    except ValueError:
        return None
    return None if tensors else data


_memo: dict = {}  # key -> (graph data or None when it cannot be stored, Summary or None)


def _entry(rule_id: str, dtype: torch.dtype, examples: Sequence[torch.Tensor],
           trace: Callable[[], fx.GraphModule]):
    key = entry_key(rule_id, dtype, examples)
    if key in _memo:
        return _memo[key]
    path = _path(key) if env_setting(ENV_PATTERN_CACHE) else None
    data = _load(path) if path is not None else None
    if data is not None:
        with _lock:
            stats["loaded"] += 1
    else:
        gm = trace()
        with _lock:
            stats["traced"] += 1
        data = _recordable(gm)
        if path is not None and data is not None:
            kernel_cache.write_atomic(path, json.dumps({"format": ENTRY_FORMAT, "sha256": _digest(data),
                                                        "graph": data}), "pattern cache entry")
    _memo[key] = found = (data, Summary(data) if data is not None else None)
    return found


def summary(rule_id: str, dtype: torch.dtype, examples: Sequence[torch.Tensor],
            trace: Callable[[], fx.GraphModule]) -> Optional[Summary]:
    """What the rule's pattern needs of a graph (None: unknown, build it), from the cache entry if any."""
    return _entry(rule_id, dtype, examples, trace)[1]


def traced(rule_id: str, dtype: torch.dtype, examples: Sequence[torch.Tensor],
           trace: Callable[[], fx.GraphModule]) -> fx.GraphModule:
    """A fresh copy of the rule's traced ATen graph: rebuilt from the cache entry when there is a valid
    one, else `trace()`d (and stored).  With the pattern cache off (ENV_PATTERN_CACHE): no disk, traced
    once a process."""
    data, _ = _entry(rule_id, dtype, examples, trace)
    return graph_io.graph_from_data(data, {}) if data is not None else trace()
