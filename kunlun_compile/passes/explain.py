"""Why didn't it fuse: after a family's pass, every node that marks the family's work -- an anchor: each
expert GEMM for the experts, each router's top-k (or first max) for the router, each rsqrt for the norms,
each rotation for the attention prologue; passes/explain_anchors.py has them -- that is still in the graph
gets one near-miss line, with the closest any of the family's patterns came to matching around it (how far
back from a pattern's output the match got, and the first node that differed).

For a spelling that no rule of the family has (a rotation of any form, dense all-expert bmm experts, a router
picking with max instead of top-k) the line says instead what was left, read off the graph (a rotation's
form, the rotated tensor, the tables' dtype and shape) and that no pattern covers it: a rotation sits inside
many patterns whose deepest failures mostly come from unrelated branches (tried on the HF corpus; those lines
misled).
A guard's refusal or an escaping intermediate is already recorded by the pattern engine; this covers the
silent case: no pattern of the family matched the spelling at all.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch._inductor import pattern_matcher as pm

from . import pattern_engine as pe
from .explain_anchors import ANCHORS, describe, op_name as _op_name
from .layouts import RELAID

aten = torch.ops.aten
# a pattern output is looked for among the nodes this close after an anchor, and a failure counts only this
# close around it: farther, a pattern (a residual add's) may fail on another branch entirely
_AFTER, _BEFORE = 16, 8


def unfused_anchors(gm: fx.GraphModule, family: str, rules: Sequence[pe.Rewrite]) -> List[str]:
    is_anchor = ANCHORS.get(family)
    if is_anchor is None:
        return []
    # a primitive put back as its reference was explained before it went back (`Stage.notes`)
    anchors = [n for n in gm.graph.nodes if n.op == "call_function" and is_anchor(n) and not n.meta.get(RELAID)]
    if not anchors:
        return []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dtypes, present = pe.graph_float_dtypes(gm), pe.present_ops(gm)
    # only the patterns the pass searched: one whose ops the graph lacks cannot be close (and is not traced)
    compiled = [c for r in rules if pe.searchable(r, present) for c in pe._patterns_for(r, dtypes)]
    lines = []
    for a in anchors:
        closest = _closest(a, compiled, order)
        if closest is _MATCHED:  # a guard refused it or an intermediate escapes: the engine said so already
            continue
        uncovered = describe(family, a)
        if uncovered is not None:  # a spelling no rule has: say what it is rather than what came closest
            lines.append(f"{family}: {a.name} ({uncovered[0]}) left unfused; {uncovered[1]}")
            continue
        why = (f"closest pattern {closest[1]} matched back from {closest[2]} to {closest[3]}, where {closest[4]}"
               if closest else "no pattern of the family matched as far back as it")
        lines.append(f"{family}: {a.name} ({_op_name(a.target)}) left unfused; {why}")
    return lines


_MATCHED = ("matched",)


def _closest(anchor: fx.Node, compiled, order):
    """(depth, rule, pattern output node, first differing node, what differed) of the deepest failed match
    of any pattern of the family ending near after the anchor and failing near it; _MATCHED when a
    pattern does match there; None when no failure comes near."""
    after = _reach(anchor, _AFTER, lambda n: n.users)
    near = set(after) | {anchor} | set(_reach(anchor, _BEFORE, lambda n: n.all_input_nodes))
    best = None
    for c in compiled:
        targets = set(c.anchor_targets)
        for cand in after:
            if cand.target not in targets:
                continue
            m = c.strict.match(cand)
            if m or c.relaxed.match(cand):  # matched, so refused by the guard or blocked by an escaping value
                return _MATCHED
            node, expected = _failure_site(m)
            if node is None or node not in order or node not in near:
                continue
            depth = order[cand] - order[node]  # how far back from its output the pattern matched
            if best is None or depth > best[0]:
                got = _op_name(node.target) if node.op == "call_function" else node.op
                what = f"the pattern has {expected}, the graph {got}" if expected else str(m).split(", pattern=")[0]
                best = (depth, c.rule.name, cand.name, node.name, what)
    return best


def _reach(node: fx.Node, limit: int, step) -> List[fx.Node]:
    """Up to `limit` nodes reached from `node` by `step` (users: forward, inputs: backward), nearest first."""
    seen, frontier, out = {node}, [node], []
    while frontier and len(out) < limit:
        nxt = []
        for n in frontier:
            for u in step(n):
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
