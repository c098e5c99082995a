"""What the backend did to each graph, as plain data.

A `GraphReport` is filled in as a graph moves through capture, passes,
lowering and the runtime; `CompileReport` aggregates all graphs of one model.
Both print as readable text and convert to JSON-ready dicts, which is what the
CLI shows.  Keys with nothing to count yet stay 0 / empty, never absent.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Callable, Dict, List, Optional

KERNEL_KINDS = ("fused", "pointwise", "aten")


@dataclasses.dataclass
class PassRecord:
    name: str
    description: str
    nodes_before: int
    nodes_after: int
    matches: int = 0
    time_ms: float = 0.0
    skipped: Optional[str] = None  # why it did not run (disabled, failed)
    # Pattern family -> matches replaced by this pass.
    patterns: Dict[str, int] = dataclasses.field(default_factory=dict)
    # Refused matches: one line each, "pattern: reason".
    near_misses: List[str] = dataclasses.field(default_factory=list)
    code_before: str = ""
    code_after: str = ""

    @property
    def changed(self) -> bool:
        return self.matches > 0 or self.nodes_before != self.nodes_after

    def as_dict(self, with_code: bool = False) -> dict:
        d = dataclasses.asdict(self)
        d["changed"] = self.changed
        if not with_code:
            d.pop("code_before")
            d.pop("code_after")
        return d


@dataclasses.dataclass
class Fallback:
    graph: str
    stage: str  # the pass, lowering or runtime step that failed
    reason: str

    def as_dict(self) -> dict:
        return {"graph": self.graph, "pass": self.stage, "reason": self.reason}


NEAR_MISSES_SHOWN = 5  # per pass, in the printed report


@dataclasses.dataclass
class GraphReport:
    name: str
    inputs: List[str] = dataclasses.field(default_factory=list)  # "f32[s0, 64]"
    mode: str = "inference"  # or "eager-grad" when run eagerly for autograd
    passes: List[PassRecord] = dataclasses.field(default_factory=list)
    kernels_before: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KERNEL_KINDS, 0))
    kernels: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KERNEL_KINDS, 0))
    sfu_ops: int = 0
    vector_ops: int = 0
    # generated element-wise kernels (lowering.describe_kernels): key, origin, counts, listing
    generated: List[dict] = dataclasses.field(default_factory=list)
    pieces: int = 0
    fallbacks: List[Fallback] = dataclasses.field(default_factory=list)
    compile_ms: float = 0.0
    recorded_at: Optional[str] = None  # where KUNLUN_COMPILE_DUMP wrote this graph
    # the graph runtime's live state (mode, pieces and why each was cut, counters): read when reported
    runtime_info: Optional[Callable[[], dict]] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def runtime(self) -> dict:
        return self.runtime_info() if self.runtime_info is not None else {}

    @property
    def patterns(self) -> Dict[str, int]:
        total = Counter()  # fusion passes record their family with 0 when nothing matched
        for p in self.passes:
            total.update(p.patterns)
        return dict(total)

    def as_dict(self, with_code: bool = False) -> dict:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "mode": self.mode,
            "passes": [p.as_dict(with_code) for p in self.passes],
            "patterns": self.patterns,
            "kernels_before": dict(self.kernels_before),
            "kernels": dict(self.kernels),
            "sfu_ops": self.sfu_ops,
            "vector_ops": self.vector_ops,
            "generated_kernels": [{k: v for k, v in g.items() if with_code or k != "source"} for g in self.generated],
            "pieces": self.pieces,
            "runtime": self.runtime,
            "fallbacks": [f.as_dict() for f in self.fallbacks],
            "compile_ms": round(self.compile_ms, 3),
            "recorded_at": self.recorded_at,
        }

    def __str__(self) -> str:
        lines = [f"graph {self.name}  inputs: {', '.join(self.inputs)}  ({self.mode}, {self.compile_ms:.1f} ms)"]
        lines.append(f"  {'pass':<22} {'nodes':>13} {'matches':>8} {'ms':>8}  note")
        for p in self.passes:
            note = p.skipped or ", ".join(f"{k}={v}" for k, v in p.patterns.items() if v)
            nodes = f"{p.nodes_before}->{p.nodes_after}"
            lines.append(f"  {p.name:<22} {nodes:>13} {p.matches:>8} {p.time_ms:>8.2f}  {note}")
        for p in self.passes:  # what almost fused, and why not
            shown = p.near_misses[:NEAR_MISSES_SHOWN]
            lines.extend(f"  near miss ({p.name}): {m}" for m in shown)
            if len(p.near_misses) > len(shown):
                lines.append(f"  near miss ({p.name}): ... {len(p.near_misses) - len(shown)} more (--json has all)")
        kb, ka = self.kernels_before, self.kernels
        lines.append(
            "  kernels before: " + _kernel_line(kb) + "   after: " + _kernel_line(ka) + f"   pieces: {self.pieces}"
        )
        if self.generated:
            lines.append(f"  generated kernels: {len(self.generated)} ({self.vector_ops} vec, {self.sfu_ops} sfu "
                         f"instructions)")
            lines.extend(f"    {g['key']}: {g['origin']}  ({g['vector_ops']} vec, {g['sfu_ops']} sfu, "
                         f"~{g['cycles_per_element']:.3f} cycles/element on {g['target']})" for g in self.generated)
        rt = self.runtime
        if rt:
            c = rt["counters"]
            lines.append(f"  runtime: {rt['mode']} ({rt['graph_api']}), padding {rt['padding']}, full graph: "
                         f"{rt['full_graph']}")
            lines.extend(f"    {p}" for p in rt["pieces"])
            lines.append("    " + ", ".join(f"{k} {v}" for k, v in c.items()))
        for f in self.fallbacks:
            lines.append(f"  FALLBACK in {f.stage}: {f.reason}")
        return "\n".join(lines)


def _kernel_line(k: Dict[str, int]) -> str:
    return f"{sum(k.values())} ({', '.join(f'{n} {kind}' for kind, n in k.items())})"


@dataclasses.dataclass
class CompileReport:
    """All graphs one backend instance compiled, in order."""

    graphs: List[GraphReport] = dataclasses.field(default_factory=list)
    # what happened outside any graph: e.g. Dynamo's recompile limit made it run a function eagerly
    notes: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        patterns = Counter()
        kernels = Counter(dict.fromkeys(KERNEL_KINDS, 0))
        kernels_before = Counter(dict.fromkeys(KERNEL_KINDS, 0))
        for g in self.graphs:
            patterns.update(g.patterns)
            kernels.update(g.kernels)
            kernels_before.update(g.kernels_before)
        return {
            "graphs": len(self.graphs),
            "patterns": dict(patterns),
            "kernels": dict(kernels),
            "kernels_before": dict(kernels_before),
            "sfu_ops": sum(g.sfu_ops for g in self.graphs),
            "vector_ops": sum(g.vector_ops for g in self.graphs),
            "pieces": sum(g.pieces for g in self.graphs),
            "runtime_counters": dict(sum((Counter(g.runtime.get("counters", {})) for g in self.graphs), Counter())),
            "fallbacks": [f.as_dict() for g in self.graphs for f in g.fallbacks],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        text = "\n\n".join(str(g) for g in self.graphs) or "(no graphs compiled)"
        return "\n".join([text] + [f"note: {n}" for n in self.notes])
