"""`kunlun-compile align`: eager and compiled, node by node.

Both forms of each graph run on the same arguments (the first call's, parameters included): the
ATen graph as the backend received it, which is eager's computation, and the graph the passes
produced.  Every value of the compiled graph that stands for a value of the received one (same
node, or a fused op's output that replaced it: `node.meta["kunlun_replaces"]`) is compared by
relative error against the dtype's tolerance.  The first node out of tolerance, in execution
order, is where the compiled graph starts to differ; later ones usually inherit it.

That comparison runs each graph once as plain code.  With a graph mode that captures pieces, the
result also has a `runtime` section (runtime_align.py): every captured piece's replays against the
piece run as plain code, and the replayed calls' outputs against eager.
"""
from __future__ import annotations

import html
from typing import Any, Dict, List

import torch
import torch.fx as fx

from ..passes.rewrites import REPLACES
from .inspect import InspectingBackend, KeptGraph
from .runtime_align import align_runtime
from .targets import TOLERANCE, Target


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: Dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function":
            self.values[n.name] = out
        return out


def _compare(got: Any, want: Any) -> Dict[str, Any]:
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)):
        return {}
    if got.shape != want.shape or got.dtype != want.dtype:
        return {"ok": False, "rel_err": float("inf"), "why": f"{tuple(got.shape)} {got.dtype} vs "
                                                             f"{tuple(want.shape)} {want.dtype}"}
    tol = TOLERANCE.get(got.dtype, 0.0)
    if not got.is_floating_point():
        same = bool(torch.equal(got, want))
        return {"ok": same, "rel_err": 0.0 if same else 1.0, "tolerance": 0.0}
    a, b = got.double(), want.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return {"ok": False, "rel_err": float("nan"), "tolerance": tol, "why": "NaN where eager has none"}
    fin = torch.isfinite(b) & torch.isfinite(a)
    err = ((a - b)[fin].norm() / b[fin].norm().clamp_min(1e-30)).item() if fin.any() else 0.0
    return {"ok": err <= tol, "rel_err": err, "tolerance": tol}


def align_graph(kept: KeptGraph) -> List[Dict[str, Any]]:
    reference, compiled = _Recorder(kept.before), _Recorder(kept.after)
    with torch.inference_mode():
        reference.run(*kept.args)
        compiled.run(*kept.args)
    rows = []
    for n in kept.after.graph.nodes:
        if n.op != "call_function" or n.name not in compiled.values:
            continue
        stands_for = n.meta.get(REPLACES, n.name)
        if stands_for not in reference.values:
            continue
        cmp = _compare(compiled.values[n.name], reference.values[stands_for])
        if cmp:
            rows.append({"graph": kept.name, "node": n.name, "replaces": stands_for if stands_for != n.name else None,
                         "op": _op_name(n), "shape": list(compiled.values[n.name].shape),
                         "dtype": str(compiled.values[n.name].dtype).replace("torch.", ""), **cmp})
    return rows


def _op_name(n: fx.Node) -> str:
    if n.target.__name__ == "getitem" and isinstance(n.args[0], fx.Node):
        return f"{_op_name(n.args[0])}[{n.args[1]}]"
    return str(getattr(n.target, "_name", None) or getattr(n.target, "__name__", n.target))


def align(target: Target, backend: InspectingBackend, worst: int = 10) -> Dict[str, Any]:
    torch._dynamo.reset()
    compiled = torch.compile(target.module, backend=backend)
    with torch.inference_mode():
        compiled(*target.inputs)
    rows = [r for kept in backend.kept if kept.after is not None and kept.args is not None
            for r in align_graph(kept)]
    bad = [r for r in rows if not r["ok"]]
    ranked = sorted(rows, key=lambda r: -(r["rel_err"] / r["tolerance"] if r.get("tolerance") else
                                          (0.0 if r["ok"] else float("inf"))))
    return {
        "target": target.name,
        "runtime": align_runtime(target, backend.config),
        "nodes_compared": len(rows),
        "aligned": len(rows) - len(bad),
        "aligned_share": (len(rows) - len(bad)) / len(rows) if rows else 1.0,
        "first_divergence": bad[0] if bad else None,
        "worst": ranked[:worst],
        "nodes": rows,
    }


def runtime_summary(runtime: Dict[str, Any]) -> str:
    """One line on the runtime section of an align result."""
    if not runtime.get("checked"):
        return f"runtime not checked ({runtime.get('why', 'no graph mode')})"
    line = (f"runtime ({runtime['graph_mode']}): {runtime['replay_checks'] - runtime['replay_checks_failed']} of "
            f"{runtime['replay_checks']} replay checks passed, replayed outputs "
            f"{'within' if runtime['output_ok'] else 'OUT OF'} tolerance (rel_err {runtime['output_rel_err']:.2e})")
    first = runtime.get("first_divergence")
    if first:
        line += (f"; first divergence: {first['graph']} piece {first['piece']}, value {first['value']} "
                 f"({first['check']})")
    return line


def html_report(result: Dict[str, Any]) -> str:
    """A self-contained page: the summary and every compared node, divergent ones marked."""
    first = result["first_divergence"]
    rows = []
    for r in result["nodes"]:
        cls = "ok" if r["ok"] else ("first" if first and r["node"] == first["node"] else "bad")
        rows.append("<tr class='{}'><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3e}</td>"
                    "<td>{:.0e}</td></tr>".format(cls, *(html.escape(str(x)) for x in (
                        r["graph"], r["node"], r["replaces"] or "", r["op"], f"{r['dtype']}{r['shape']}")),
                        r["rel_err"], r.get("tolerance", 0.0)))
    summary = (f"{result['aligned']} of {result['nodes_compared']} nodes aligned "
               f"({100 * result['aligned_share']:.1f}%)")
    if first:
        summary += f"; first divergence: {first['node']} ({first['op']}), rel_err {first['rel_err']:.3e}"
    summary += "; " + runtime_summary(result.get("runtime") or {})
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>kunlun-compile align: {html.escape(result['target'])}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}}
td,th{{padding:2px 8px;border-bottom:1px solid #ddd;font-family:monospace}}
tr.bad td{{background:#fdd}} tr.first td{{background:#f88;font-weight:bold}}</style></head>
<body><h1>align: {html.escape(result['target'])}</h1><p id="summary">{html.escape(summary)}</p>
<table id="nodes"><tr><th>graph</th><th>node</th><th>stands for</th><th>op</th><th>value</th><th>rel err</th>
<th>tolerance</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
