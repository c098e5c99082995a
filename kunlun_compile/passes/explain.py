"""Why didn't it fuse: after a family's pass, every node that marks the family's work -- an anchor: each
grouped or gathered expert GEMM for the experts, each top-k for the router, each rsqrt for the norms --
that is still in the graph gets one near-miss line, with the closest any of the family's patterns came to
matching around it (how far back from a pattern's output the match got, and the first node that differed).

For the attention prologue the anchor is a rotation (`-x2` going into `rotate_half`'s `cat` or the pair
form's `stack`), and the line describes the rotation that was left (its form, the rotated tensor, the
tables' dtype and shape) instead of the closest pattern: a rotation sits inside many patterns whose deepest
failures mostly come from unrelated branches (tried on the HF corpus; those lines misled).
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
# a pattern output is looked for among the nodes this close after an anchor, and a failure counts only this
# close around it: farther, a pattern (a residual add's) may fail on another branch entirely
_AFTER, _BEFORE = 16, 8


def _is_expert_gemm(node: fx.Node) -> bool:
    """A grouped GEMM, or a bmm against weights gathered by expert id (attention's bmm is not one)."""
    if node.op == "call_function" and "grouped_mm" in _op_name(node.target):
        return True
    return node.target is aten.bmm.default and any(
        isinstance(a, fx.Node) and a.target is aten.index.Tensor for a in node.args[:2])


def _is_rotation(node: fx.Node) -> bool:
    """The `-x2` of a rotary rotation: a negation going into a `cat` (neox halves) or a `stack` (pairs)."""
    return node.target is aten.neg.default and any(
        u.target in (aten.cat.default, aten.stack.default) for u in node.users)


ANCHORS: Dict[str, Callable[[fx.Node], bool]] = {
    "moe_ffn": _is_expert_gemm,
    "moe_gate": lambda n: n.target is aten.topk.default,
    "add_rmsnorm": lambda n: n.target is aten.rsqrt.default,
    "norm_rope_gate": _is_rotation,
}


def _describe_rotation(neg: fx.Node) -> str:
    """'a rotation of <tensor> with tables <cos>' read off the graph around the `-x2`, as far as it goes."""
    turn = next(u for u in neg.users if u.target in (aten.cat.default, aten.stack.default))
    form = "neox halves (cat)" if turn.target is aten.cat.default else "pairs (stack)"
    turned = _follow_views(turn)
    by_sin = next((u for u in turned.users if u.target is aten.mul.Tensor), None)
    total = next((u for u in by_sin.users if u.target is aten.add.Tensor), None) if by_sin else None
    other = next((a for a in total.args if isinstance(a, fx.Node) and a is not by_sin), None) if total else None
    parts = [f"rotary rotation, {form}"]
    half = neg.args[0]
    rotated = half.args[0] if isinstance(half, fx.Node) and half.target is aten.slice.Tensor else None
    if other is not None and other.target is aten.mul.Tensor and rotated in other.args[:2]:
        cos = next(a for a in other.args[:2] if a is not rotated)
        parts.append(f"of {_val(rotated)} with cos {_val(cos)}")
    return ", ".join(parts)


def _follow_views(node: fx.Node) -> fx.Node:
    while len(node.users) == 1:
        (user,) = node.users
        if user.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            break
        node = user
    return node


def _val(node) -> str:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}"
    return "?"


def unfused_anchors(gm: fx.GraphModule, family: str, rules: Sequence[pe.Rewrite]) -> List[str]:
    is_anchor = ANCHORS.get(family)
    if is_anchor is None:
        return []
    anchors = [n for n in gm.graph.nodes if n.op == "call_function" and is_anchor(n)]
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
        if family == "norm_rope_gate":
            lines.append(f"{family}: {a.name} ({_describe_rotation(a)}) left unfused; no pattern of the family "
                         f"covers this spelling of the prologue")
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


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    if callable(name):
        return name()
    return getattr(target, "__name__", str(target))
