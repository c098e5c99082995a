"""Warm starts: the pass pipeline's output is stored by the first compile and loaded by the next.

The backend (backend.py) transforms each ATen graph with `backend.pass_manager.run(gm, ctx,
report)`.  `install` wraps that pass manager: inside a `warm_start(store, ...)` block (vLLM's
compile and load calls, compiler.py) the run first looks the graph up by its key (graph_key.py);
a hit rebuilds the transformed graph, its generated kernels and its pass records without running
a pass; a miss runs the passes and stores the result.  Outside such a block it is the plain pass
manager.  AOTAutograd's trace and the graph runtime still run on a warm start: they rebuild
process state (fake tensors, runtime wrappers) that is cheap to make and not worth storing.

A corrupt entry, or a vLLM handle naming an entry made from other inputs (another torch, other
options, another graph), costs one warning naming the reason, and the graph is compiled again
(and stored again).  Graphs whose passes failed are not stored: the failure and its warning come
back on every start rather than being frozen into the cache.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from typing import Any, Dict, Iterator, List, Optional, Set

import torch
import torch.fx as fx

from ..capture import graph_io
from ..capture.graph_io import graph_from_data, graph_to_data
from ..graph_stats import generated_kernels
from ..report import GraphReport, PassRecord
from ..utils import warn_once
from .graph_key import NotCacheable, differences, key_components, key_of
from .graph_store import CorruptEntry, GraphStore

META_PREFIX = "kunlun_"  # node meta the passes leave for the debug tools (replaced node, lowered nodes)


@dataclasses.dataclass
class WarmStartStats:
    """Per process: graphs whose passes ran, graphs loaded instead, and why any was not loaded."""

    compiled: int = 0
    loaded: int = 0
    events: List[Dict[str, str]] = dataclasses.field(default_factory=list)  # {"graph", "event", "reason"}

    def note(self, graph: str, event: str, reason: str = "") -> None:
        self.events.append({"graph": graph, "event": event, "reason": reason})

    def as_dict(self) -> dict:
        return {"compiled": self.compiled, "loaded": self.loaded, "events": list(self.events)}


class Session:
    """One vLLM compile or load call: where entries live, which entry vLLM's handle names."""

    def __init__(self, store: GraphStore, expected: Optional[str], stats: WarmStartStats, warned: Set[str]):
        self.store = store
        self.expected = expected  # the key the handle names (load) or None (compile)
        self.stats = stats
        self.warned = warned
        self.key: Optional[str] = None  # the first graph stored or loaded: what vLLM's handle will name

    def run_passes(self, inner, gm: fx.GraphModule, ctx, report: GraphReport, keep_code: bool) -> fx.GraphModule:
        name = ctx.graph_name
        expected, self.expected = self.expected, None  # a handle names one graph: the first
        try:
            components = key_components(gm, ctx.config, inner.names)
        except Exception as e:  # noqa: BLE001 - NotCacheable, or a bug here: neither may stop the compile
            reason = str(e) if isinstance(e, NotCacheable) else f"{type(e).__name__}: {e}"
            warn_once(f"kunlun backend: {name} is not cached for warm starts: {reason}", self.warned)
            return self._compile(inner, gm, ctx, report, keep_code, None, None, reason)
        key = key_of(components)
        namespaces = op_namespaces(gm)  # before the passes edit gm: what the live graph may call
        problem = None
        try:
            entry = self.store.load(key)
            if entry is not None:
                if entry["components"] != components:
                    raise CorruptEntry("its key parts do not match its name")
                loaded = restore(entry, gm, report, namespaces)
                self.stats.loaded += 1
                self.stats.note(name, "loaded")
                self.key = self.key or key
                return loaded
        except CorruptEntry as e:
            problem = f"its cached entry {key} is corrupt: {e}"
        if problem is None and expected:
            stored = self.store.components(expected) if expected != key else None
            diff = differences(stored, components) if stored else []
            problem = (f"its cached entry was made with {'; '.join(diff)}" if diff
                       else f"its cached entry {expected} is missing")
        if problem:
            warn_once(f"kunlun backend: {name} is compiled again ({problem})", self.warned)
        return self._compile(inner, gm, ctx, report, keep_code, key, components, problem, namespaces)

    def _compile(self, inner, gm, ctx, report: GraphReport, keep_code: bool, key: Optional[str],
                 components: Optional[Dict[str, str]], problem: Optional[str],
                 namespaces: Set[str] = frozenset()) -> fx.GraphModule:
        records_before, fallbacks_before = len(report.passes), len(report.fallbacks)
        out = inner.run(gm, ctx, report, keep_code)
        self.stats.compiled += 1
        if key is None:
            self.stats.note(ctx.graph_name, "not cached", problem or "")
            return out
        if len(report.fallbacks) > fallbacks_before:
            self.stats.note(ctx.graph_name, "not cached", "a pass failed")
            return out
        try:
            payload, constants = snapshot(out, report.passes[records_before:], namespaces)
            self.store.save(key, components, payload, constants)
        except Exception as e:  # noqa: BLE001 - the graph is compiled; only the next start pays
            reason = f"{type(e).__name__}: {e}"
            warn_once(f"kunlun backend: {ctx.graph_name} is not cached for warm starts: {reason}", self.warned)
            self.stats.note(ctx.graph_name, "not cached", reason)
            return out
        self.stats.note(ctx.graph_name, "recompiled" if problem else "compiled", problem or "")
        self.key = self.key or key
        return out


_session: contextvars.ContextVar[Optional[Session]] = contextvars.ContextVar("kunlun_warm_start", default=None)


@contextlib.contextmanager
def warm_start(store: Optional[GraphStore], expected: Optional[str], stats: WarmStartStats,
               warned: Set[str]) -> Iterator[Optional[Session]]:
    """Within this block the installed pass managers use `store` (None: no caching)."""
    session = Session(store, expected, stats, warned) if store is not None else None
    token = _session.set(session)
    try:
        yield session
    finally:
        _session.reset(token)


class CachingPassManager:
    """A pass manager that, inside `warm_start`, loads or stores its output; the wrapped one otherwise."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # names, passes, check_disabled: the wrapped manager's
        return getattr(self.inner, name)

    def run(self, gm: fx.GraphModule, ctx, report: Optional[GraphReport] = None,
            keep_code: bool = False) -> fx.GraphModule:
        session = _session.get()
        if session is None or report is None or _rewrites_limited():
            return self.inner.run(gm, ctx, report, keep_code)
        return session.run_passes(self.inner, gm, ctx, report, keep_code)


def install(backend) -> None:
    """Make `backend`'s pass manager a caching one (once)."""
    if not isinstance(backend.pass_manager, CachingPassManager):
        backend.pass_manager = CachingPassManager(backend.pass_manager)


def _rewrites_limited() -> bool:
    # `kunlun-compile bisect` limits rewrites (passes/rewrites.py): its graphs must not be stored or loaded
    from ..passes.rewrites import _log

    return _log.get() is not None


# ---- entry <-> graph -------------------------------------------------------------------------------------

def op_namespaces(gm: fx.GraphModule) -> Set[str]:
    """The namespaces of the ops `gm` calls, directly or through a higher-order op's argument."""
    found: Set[str] = set()

    def visit(v: Any) -> None:
        if isinstance(v, torch._ops.OpOverload):
            found.add(v.namespace)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    for node in gm.graph.nodes:
        visit((node.target, node.args, node.kwargs))
    return found


def also_trusting(namespaces: Set[str]):
    """graph_io loads only ops of its trusted namespaces (recorded graphs come from bug reports).
    An entry of this cache was written by this package next to vLLM's own artifacts, and may call
    what the live graph it stands for calls (vLLM's `_C::onednn_mm` on the CPU), so those
    namespaces are trusted while it loads."""
    return graph_io.trusting(namespaces)


def snapshot(gm: fx.GraphModule, records: List[PassRecord], namespaces: Set[str] = frozenset()) -> tuple:
    """(payload, constants) of a transformed graph; raises what makes it unstorable."""
    from ..lowering.cache import kir_for

    data, constants = graph_to_data(gm)
    with also_trusting(namespaces):  # what could not be loaded back is not stored
        graph_from_data(json.loads(json.dumps(data)), constants)
    meta = {n.name: {k: v for k, v in n.meta.items() if k.startswith(META_PREFIX)} for n in gm.graph.nodes}
    payload = {
        "graph": data,
        "placeholders": [n.name for n in gm.graph.find_nodes(op="placeholder")],
        "records": [dataclasses.asdict(r) for r in records],
        "kernels": {key: kir_for(key).to_json() for key in generated_kernels(gm)},
        "meta": {name: m for name, m in meta.items() if m},
    }
    json.dumps(payload)  # fails here, not half-way through writing, on a value JSON cannot hold
    return payload, constants


def restore(entry: Dict[str, Any], received: fx.GraphModule, report: GraphReport,
            namespaces: Set[str] = frozenset()) -> fx.GraphModule:
    """The stored transformed graph, ready to run in place of the passes' output: its kernels
    registered, the nodes' meta values propagated from `received`'s inputs, its pass records
    added to `report` (with zero time: no pass ran here)."""
    from ..lowering.cache import register
    from ..lowering.kir import KernelIR

    payload = entry["payload"]
    try:
        for key, kir_json in payload["kernels"].items():
            kir = KernelIR.from_json(kir_json)
            if kir.key != key:
                raise CorruptEntry(f"kernel {key} does not hash to its name")
            register(kir)
        with also_trusting(namespaces):
            gm = graph_from_data(payload["graph"], entry["constants"])
        inputs = {n.name: n.meta.get("val") for n in received.graph.find_nodes(op="placeholder")}
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        if names != payload["placeholders"] or names != list(inputs):
            raise CorruptEntry("its inputs are not the received graph's")
        for node in gm.graph.nodes:
            node.meta.update(payload["meta"].get(node.name, {}))
        propagate_meta(gm, [inputs[n] for n in names])
        records = [PassRecord(**{**r, "time_ms": 0.0}) for r in payload["records"]]
    except CorruptEntry:
        raise
    except Exception as e:  # noqa: BLE001 - whatever fails to rebuild, the entry is unusable
        raise CorruptEntry(f"cannot be rebuilt: {type(e).__name__}: {e}") from e
    report.passes.extend(records)
    return gm


def propagate_meta(gm: fx.GraphModule, input_vals: List[Any]) -> None:
    """Every node's meta["val"] (the graph runtime and the precompiler read them), from the received
    graph's input values, in their fake mode; a data-dependent op's fresh symbol is not left pending
    in the shape environment (that would break whatever traces next)."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = detect_fake_mode([v for v in input_vals if isinstance(v, torch.Tensor)])
    if mode is None:
        FakeTensorProp(gm).propagate(*input_vals)
        return
    ignore = mode.shape_env.ignore_fresh_unbacked_symbols() if mode.shape_env else contextlib.nullcontext()
    with ignore:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*input_vals)
