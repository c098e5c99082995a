"""The graph runtime, piece by piece: do replays compute what the pieces compute as plain code?

`align_runtime` compiles a target with a graph mode, calls it until every piece has been warmed up,
captured and replayed, and on each replay compares every captured piece's outputs with the same piece
run as plain code on the same inputs, and every value crossing pieces with what it held when it was
made (runtime/checking.py, in its recording form).  It also compares the replayed call's outputs with
eager's: a node-by-node alignment of the compiled graph (align.py) runs the graph once, as plain code,
and cannot see the runtime at all.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..backend import KunlunBackend
from ..config import CompileConfig
from ..runtime.piecewise import resolve_mode
from .targets import Target, compare_outputs

# warm-up, capture, then replays: the last calls are compared
CALLS = 4


def graph_mode_of(config: CompileConfig, target: Target) -> str:
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in target.inputs)
    return resolve_mode(config.graph_mode, on_cuda)


def run_replays(target: Target, config: CompileConfig, record: bool) -> Dict[str, Any]:
    """Compile `target` with `config`, call it CALLS times; the worst output comparison with eager over
    the calls and (with `record`) every replay check."""
    backend = KunlunBackend(config)
    torch._dynamo.reset()
    compiled = torch.compile(target.module, backend=backend)
    findings: List[Dict[str, Any]] = []
    comparisons = []
    # no_grad as HF generate() runs (under inference_mode Dynamo keeps parameters out of the graph's
    # inputs, so a graph after a break is not shared by layers and some runtime paths go unused)
    with torch.no_grad():
        want = target.module(*target.inputs)
        for call in range(CALLS):
            if record and call == 1:  # after the first call every runtime exists: record its checks
                for rt in backend.runtimes.values():
                    rt.replay_findings = findings
            comparisons.append(compare_outputs(compiled(*target.inputs), want))
    worst = max(comparisons, key=lambda c: (not c.ok, c.rel_err))
    return {"output": worst, "findings": findings, "backend": backend}


def align_runtime(target: Target, config: CompileConfig) -> Dict[str, Any]:
    mode = graph_mode_of(config, target)
    if mode == "none":
        return {"graph_mode": "none", "checked": False,
                "why": "graph mode none: no pieces are captured (give --graph-mode piecewise/full to check them)"}
    run = run_replays(target, config, record=True)
    rows = run["findings"]
    bad = [r for r in rows if not r["ok"]]
    out = run["output"]
    return {
        "graph_mode": mode,
        "checked": True,
        "replay_checks": len(rows),
        "replay_checks_failed": len(bad),
        "first_divergence": bad[0] if bad else None,
        "output_ok": out.ok,
        "output_rel_err": out.rel_err,
        "checks": rows,
    }
