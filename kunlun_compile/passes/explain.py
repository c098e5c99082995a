"""Why didn't it fuse: after a family's pass, every node that marks the family's work -- an anchor: each
grouped or gathered expert GEMM for the experts, each top-k for the router, each rsqrt for the norms --
that is still in the graph gets one near-miss line, with the closest any of the family's patterns came to
matching around it (how far back from a pattern's output the match got, and the first node that differed).

A guard's refusal or an escaping intermediate is already recorded by the pattern engine; this covers the
silent case: no pattern of the family matched the spelling at all.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch._inductor import pattern_matcher as pm

from . import pattern_engine as pe

aten = torch.ops.aten
_REACH = 48  # nodes after an anchor searched for a pattern output: a family's pattern spans fewer


def _is_expert_gemm(node: fx.Node) -> bool:
    """A grouped GEMM, or a bmm against weights gathered by expert id (attention's bmm is not one)."""
    name = getattr(node.target, "name", lambda: "")()
    if "grouped_mm" in name:
        return True
    return node.target is aten.bmm.default and any(
        isinstance(a, fx.Node) and a.target is aten.index.Tensor for a in node.args[:2])


ANCHORS: Dict[str, Callable[[fx.Node], bool]] = {
    "moe_ffn": _is_expert_gemm,
    "moe_gate": lambda n: n.target is aten.topk.default,
    "add_rmsnorm": lambda n: n.target is aten.rsqrt.default,
}


def unfused_anchors(gm: fx.GraphModule, family: str, rules: Sequence[pe.Rewrite]) -> List[str]:
    is_anchor = ANCHORS.get(family)
    if is_anchor is None:
        return []
    anchors = [n for n in gm.graph.nodes if n.op == "call_function" and is_anchor(n)]
    if not anchors:
        return []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dtypes = pe.graph_float_dtypes(gm)
    compiled = [c for r in rules for c in pe._patterns_for(r, dtypes)]
    lines = []
    for a in anchors:
        closest = _closest(a, compiled, order)
        why = (f"closest pattern {closest[1]} matched back from {closest[2]} to {closest[3]}, where {closest[4]}"
               if closest else "no pattern of the family ends after it")
        lines.append(f"{family}: {a.name} ({_op_name(a.target)}) left unfused; {why}")
    return lines


def _closest(anchor: fx.Node, compiled, order) -> Optional[Tuple[int, str, str, str, str]]:
    """(depth, rule, pattern output node, first differing node, what differed) of the deepest failed match
    of any pattern at any node within _REACH after the anchor."""
    after = _descendants(anchor, _REACH)
    best = None
    for c in compiled:
        targets = set(c.anchor_targets)
        for cand in after:
            if cand.target not in targets:
                continue
            m = c.strict.match(cand)
            if m:  # matched now (the pass ran before this one, or a guard refused): the engine said why
                continue
            node, expected = _failure_site(m)
            if node is None or node not in order:
                continue
            depth = order[cand] - order[node]
            if best is None or depth > best[0]:
                got = _op_name(node.target) if node.op == "call_function" else node.op
                what = f"the pattern has {expected}, the graph {got}" if expected else str(m).split(", pattern=")[0]
                best = (depth, c.rule.name, cand.name, node.name, what)
    return best


def _descendants(node: fx.Node, limit: int) -> List[fx.Node]:
    seen, frontier, out = {node}, [node], []
    while frontier and len(out) < limit:
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in seen:
                    seen.add(u)
                    out.append(u)
                    nxt.append(u)
        frontier = nxt
    return out[:limit]


def _failure_site(failure) -> Tuple[Optional[fx.Node], str]:
    """The graph node a FailedMatch stopped at and the op(s) the pattern wanted there."""
    node, expected = None, ""
    for a in getattr(failure, "args", ()):
        if isinstance(a, fx.Node) and node is None:
            node = a
        elif isinstance(a, pm._TargetExpr):
            expected = "/".join(_op_name(f) for f in a.fns[:2])
        elif isinstance(a, pm.FailedMatch):
            inner = _failure_site(a)
            if inner[0] is not None:
                return inner
    return node, expected


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    if callable(name):
        return name()
    return getattr(target, "__name__", str(target))
