"""The pass manager: an ordered list of named graph rewrites.

Passes are small functions `fn(gm, ctx) -> PassOutcome` that edit the graph in
place.  Everything around them (skipping disabled passes, timing, counting
nodes, snapshotting so that a failing pass can be undone, the one warning on
failure) lives here, once, rather than in every pass.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch.fx as fx

from ..config import CompileConfig
from ..report import Fallback, GraphReport, PassRecord
from ..utils import copy_graph_module, recompile_deferred, warn_once
from .rewrites import running_pass


@dataclasses.dataclass
class PassOutcome:
    """What one pass did: replaced matches, per pattern family, and refusals."""

    matches: int = 0
    patterns: Dict[str, int] = dataclasses.field(default_factory=dict)
    near_misses: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PassContext:
    config: CompileConfig
    graph_name: str
    warned: set = dataclasses.field(default_factory=set)  # one warning per problem per backend


@dataclasses.dataclass(frozen=True)
class GraphPass:
    name: str
    description: str
    fn: Callable[[fx.GraphModule, PassContext], PassOutcome]
    family: bool = False  # a fusion pass: its name is a pattern family, counted in every report (0 if none)


class PassFailure(RuntimeError):
    """Raised under strict=True when a pass fails."""


class PassManager:
    def __init__(self, passes: Sequence[GraphPass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pass names in {names}")
        self.passes = list(passes)

    @property
    def names(self) -> List[str]:
        return [p.name for p in self.passes]

    def check_disabled(self, config: CompileConfig) -> None:
        unknown = [n for n in config.disable if n not in self.names]
        if unknown:
            raise ValueError(f"kunlun backend: cannot disable unknown pass(es) {unknown}; passes are {self.names}")

    def run(self, gm: fx.GraphModule, ctx: PassContext, report: Optional[GraphReport] = None,
            keep_code: bool = False) -> fx.GraphModule:
        with _collection_deferred():
            return self._run(gm, ctx, report, keep_code)

    def _run(self, gm: fx.GraphModule, ctx: PassContext, report: Optional[GraphReport],
             keep_code: bool) -> fx.GraphModule:
        for p in self.passes:
            before = _node_count(gm)
            record = PassRecord(p.name, p.description, before, before)
            record.patterns = {p.name: 0} if p.family else {}
            if report is not None:
                report.passes.append(record)
            if not ctx.config.is_enabled(p.name):
                record.skipped = "disabled"
                continue
            if p.family and not ctx.config.fusion:
                record.skipped = "fusion off"
                continue
            if keep_code:
                record.code_before = gm.code
            snapshot = copy_graph_module(gm)
            t0 = time.perf_counter()
            try:
                with running_pass(p.name, ctx.graph_name), recompile_deferred():
                    outcome = p.fn(gm, ctx) or PassOutcome()
                gm.graph.lint()
                gm.recompile()
            except Exception as e:  # noqa: BLE001 - any pass bug must not break the model
                record.time_ms = (time.perf_counter() - t0) * 1e3
                reason = f"{type(e).__name__}: {e}"
                if ctx.config.strict:
                    raise PassFailure(f"pass {p.name!r} failed on graph {ctx.graph_name}: {reason}") from e
                warn_once(f"kunlun backend: pass {p.name!r} failed on graph {ctx.graph_name} and was skipped "
                          f"for that graph: {reason}", ctx.warned)
                record.skipped = f"failed: {reason}"
                if report is not None:
                    report.fallbacks.append(Fallback(ctx.graph_name, p.name, reason))
                gm = snapshot
                continue
            record.time_ms = (time.perf_counter() - t0) * 1e3
            record.matches = outcome.matches
            record.patterns.update(outcome.patterns)
            record.near_misses = list(outcome.near_misses)
            record.nodes_after = _node_count(gm)
            if keep_code:
                record.code_after = gm.code
        return gm


@contextlib.contextmanager
def _collection_deferred():
    """Python's cyclic garbage collection paused while the passes run, resumed (not skipped) after.  The
    passes allocate many small objects (pattern summaries, match state); each collection they trigger walks
    torch's and the model's whole heap: measured 180 of the 280 ms the prologue pass took on
    deepseek-v3-tiny (benchmarks/NOTES.md v19)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # what the passes dropped is freed now (only the youngest generation is walked: everything allocated
        # while paused is in it): traced patterns and replacements hold fake tensors of the model's shape
        # environment, and Dynamo must not see them when it produces the graph's guards
        gc.collect(0)
        if was_enabled:
            gc.enable()


def _node_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
