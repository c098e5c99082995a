"""The anchors of passes/explain.py: the nodes that mark a family's work, read off the graph, and for the
spellings no rule of the family has, what the left node is and why it stayed.

An anchor is one node per piece of the family's work: a grouped or gathered expert GEMM, or a bmm against
the whole stacked expert weights (dense experts, every token through every expert); a top-k, or the first
`max` over the experts that picks one without a top-k (sparsemixer); an rsqrt; a rotary rotation: the
`-x2` going into rotate_half's `cat` (or the pair form's `stack`), the `cat`/`stack` of
`x1 cos - x2 sin` and `x2 cos + x1 sin` (no `-x2`: chunked halves, even/odd slices), or the complex
multiply of a `view_as_complex` by the tables read back with `view_as_real`.

`describe(family, node)` says what an anchor of a spelling that no rule covers is ("dense experts: ...");
None for the spellings the rules do have, whose line explain.py builds from the closest pattern instead.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.flatten.using_ints)
_CATS = (aten.cat.default, aten.stack.default)
_ACTIVATIONS = {aten.silu.default, aten.gelu.default, aten.sigmoid.default, aten.relu.default, aten.tanh.default}
# what an expert FFN does between its two GEMMs (split gate/up, activation, products, casts, views)
_FFN_STEPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor,
              aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.clamp.default, aten.clamp_min.default,
              aten.clamp_max.default, aten._to_copy.default, aten.neg.default, aten.div.Tensor, aten.pow.Tensor_Scalar,
              aten.mul.Scalar, aten.add.Scalar} | set(_VIEWS) | _ACTIVATIONS
_NO_RULE = "no pattern of the family covers this spelling of the prologue"


# ---- moe_ffn --------------------------------------------------------------------------------------------------

def is_expert_gemm(node: fx.Node) -> bool:
    """A grouped GEMM, or a bmm against weights gathered by expert id (attention's bmm is not one)."""
    if node.op == "call_function" and "grouped_mm" in op_name(node.target):
        return True
    return node.target is aten.bmm.default and any(
        isinstance(a, fx.Node) and a.target is aten.index.Tensor for a in node.args[:2])


def opaque_experts_op(node: fx.Node) -> Optional[str]:
    """The name of a serving framework's own fused-experts op this node calls (vLLM's `_C.cpu_fused_moe`,
    functionalized around its output buffer), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if "auto_functionalized" in op_name(target) and node.args:
        target = node.args[0]
    name = op_name(target)
    return name if "fused_moe" in name and not name.startswith("kunlun::") else None


def _describe_opaque_experts(node: fx.Node) -> str:
    return f"{opaque_experts_op(node)}: the routed experts as one opaque kernel"


# what picks the experts (or orders the pairs by expert): a rule fusing the experts reads the ids these make
_ROUTER_OPS = {aten.topk.default, aten.sort.default, aten.argsort.default, aten.argsort.stable}
_ROUTER_KERNELS = ("kunlun::moe_gate", "kunlun::router")


def routed_without_router(node: fx.Node, limit: int = 400) -> bool:
    """An expert GEMM none of whose inputs comes from a top-k or sort of this graph: the router ran in an
    earlier graph (Dynamo breaks the graph at a data-dependent op such as `bincount` or `nonzero`)."""
    if not is_expert_gemm(node):
        return False
    seen, stack = set(), list(node.all_input_nodes)
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and (n.target in _ROUTER_OPS or op_name(n.target) in _ROUTER_KERNELS):
            return False
        stack.extend(n.all_input_nodes)
    return len(seen) < limit


def _describe_routed_without_router(node: fx.Node) -> str:
    return f"{op_name(node.target)} of {val(node.args[0])}: expert GEMM whose expert order comes in as a graph input"


def _stacked_weight(node) -> Optional[fx.Node]:
    """The 3-D parameter (placeholder or attribute, maybe cast) a bmm's second operand is, else None."""
    while isinstance(node, fx.Node) and node.target is aten._to_copy.default:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr"):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() == 3:
            return node
    return None


def _dense_gemm_weight(node: fx.Node) -> Optional[fx.Node]:
    if node.target is not aten.bmm.default or len(node.args) < 2:
        return None
    return _stacked_weight(node.args[1])


def _ffn_partner(bmm: fx.Node, forward: bool, limit: int = 32) -> Optional[fx.Node]:
    """The other GEMM of a dense expert FFN: a bmm against stacked weights with the same leading (expert)
    dim, reached from `bmm` through the FFN's element-wise steps only, an activation among them (an
    attention's softmax, a reduction or an opaque op in between means it is no FFN; so does no activation)."""
    experts = _dense_gemm_weight(bmm).meta["val"].shape[0]
    seen, frontier = {(bmm, False)}, [(bmm, False)]
    while frontier and len(seen) < limit:
        nxt = []
        for n, activated in frontier:
            for m in (n.users if forward else n.all_input_nodes):
                w = _dense_gemm_weight(m)
                if w is not None and m is not bmm:
                    if activated and w.meta["val"].shape[0] == experts and (not forward or n is m.args[0]):
                        return m
                    continue
                if m.op == "call_function" and (m.target in _FFN_STEPS or _is_getitem(m)):
                    state = (m, activated or m.target in _ACTIVATIONS)
                    if state not in seen:
                        seen.add(state)
                        nxt.append(state)
        frontier = nxt
    return None


def is_dense_expert_gemm(node: fx.Node) -> bool:
    """A bmm of the tokens against the whole stacked expert weights [E, K, N] (Llama4's experts): one of the
    FFN's two such GEMMs, the other reached through the activation."""
    if _dense_gemm_weight(node) is None:
        return False
    return _ffn_partner(node, True) is not None or _ffn_partner(node, False) is not None


def _describe_dense_experts(node: fx.Node) -> str:
    which = "gate/up" if _ffn_partner(node, True) is not None else "down"
    return (f"dense experts, the {which} GEMM: bmm of {val(node.args[0])} by the whole {val(node.args[1])} "
            f"expert weights, every token through every expert (no gather, no grouped GEMM)")


# ---- moe_gate -------------------------------------------------------------------------------------------------

def _picked(node: fx.Node) -> Optional[fx.Node]:
    """The indices a `max.dim`/`argmax` over the last dim of a 2-D float [tokens, experts] tensor picks."""
    if node.target not in (aten.max.dim, aten.argmax.default) or not node.args:
        return None
    x = node.args[0]
    v = x.meta.get("val") if isinstance(x, fx.Node) else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not (isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point() and dim in (-1, 1)):
        return None
    if node.target is aten.argmax.default:
        return node
    return next((u for u in node.users if _is_getitem(u) and u.args[1] == 1), None)


def _router_max(node: fx.Node) -> bool:
    """A max over the experts whose pick weights the tokens: its indices gather from the router's
    probabilities (greedy decoding's argmax over the vocabulary gathers nothing)."""
    ids = _picked(node)
    return ids is not None and any(u.target is aten.gather.default and u.args[2] is ids for u in ids.users)


def _previous_round(node: fx.Node) -> Optional[fx.Node]:
    """The max of the round before: this max's input masks out (scatter) the expert that one picked."""
    x = node.args[0]
    if x.target in (aten.scatter.value, aten.scatter.src) and _is_getitem(x.args[2]):
        before = x.args[2].args[0]
        if before.op == "call_function" and _router_max(before):
            return before
    return None


def is_router_without_topk(node: fx.Node) -> bool:
    """The first max of a router that picks its experts by rounds of max (Phimoe's sparsemixer)."""
    return _router_max(node) and _previous_round(node) is None


def _describe_router(node: fx.Node) -> str:
    rounds, n = 1, node
    while True:
        after = next((m for s in n.users for i in s.users if i.target in (aten.scatter.value, aten.scatter.src)
                      and i.args[2] is s for m in i.users if _router_max(m) and _previous_round(m) is n), None)
        if after is None:
            break
        rounds, n = rounds + 1, after
    times = f"{rounds} rounds" if rounds > 1 else "one round"
    ids = _picked(node)
    source = next(u.args[0] for u in ids.users if u.target is aten.gather.default and u.args[2] is ids)
    weights = ("a (masked) softmax" if isinstance(source, fx.Node) and source.target is aten._softmax.default
               else op_name(source.target) if isinstance(source, fx.Node) else "?")
    return (f"router without top-k: {times} of {op_name(node.target)} over the experts of {val(node.args[0])} "
            f"logits, each pick weighted by a gather from {weights}")


# ---- norm_rope_gate -------------------------------------------------------------------------------------------

def _is_neg_rotation(node: fx.Node) -> bool:
    """The `-x2` of rotate_half: a negation going into a `cat` (neox halves) or a `stack` (pairs)."""
    return node.target is aten.neg.default and any(u.target in _CATS for u in node.users)


def _through_views(node):
    while isinstance(node, fx.Node) and node.target in _VIEWS:
        node = node.args[0]
    return node


def _products(node) -> Optional[List[fx.Node]]:
    """The two factors' pairs of `a*b -/+ c*d`, or None."""
    if not (isinstance(node, fx.Node) and node.target in (aten.sub.Tensor, aten.add.Tensor) and len(node.args) == 2
            and node.kwargs.get("alpha", 1) == 1):
        return None
    if not all(isinstance(m, fx.Node) and m.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in m.args)
               for m in node.args):
        return None
    return list(node.args)


def _sum_rotation(turn: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(the sub, the add) of a rotation written without `-x2`: `cat`/`stack` of `x1*c - x2*s` and
    `x2*c + x1*s` (each maybe unsqueezed), the four factors the same two halves and two tables."""
    if turn.target not in _CATS or not turn.args or not isinstance(turn.args[0], (list, tuple)):
        return None
    parts = [_through_views(p) for p in turn.args[0]]
    subs = [p for p in parts if isinstance(p, fx.Node) and p.target is aten.sub.Tensor]
    adds = [p for p in parts if isinstance(p, fx.Node) and p.target is aten.add.Tensor]
    if len(parts) != 2 or len(subs) != 1 or len(adds) != 1:
        return None
    minus, plus = _products(subs[0]), _products(adds[0])
    if minus is None or plus is None:
        return None
    pairs_minus = [frozenset(m.args) for m in minus]
    pairs_plus = [frozenset(m.args) for m in plus]
    factors = set().union(*pairs_minus)
    if len(factors) != 4 or factors != set().union(*pairs_plus) or set(pairs_minus) & set(pairs_plus):
        return None
    return subs[0], adds[0]


def _is_complex_rotation(node: fx.Node) -> bool:
    """The complex multiply of a rotation: `view_as_complex(x) * tables`, read back with `view_as_real`."""
    if node.target is not aten.mul.Tensor or not any(u.target is aten.view_as_real.default for u in node.users):
        return False
    return any(isinstance(a, fx.Node) and _through_views(a).target is aten.view_as_complex.default
               for a in node.args[:2])


def is_rotation(node: fx.Node) -> bool:
    return _is_neg_rotation(node) or _sum_rotation(node) is not None or _is_complex_rotation(node)


def _source(node):
    """What a half of the rotated tensor is cut from (a slice's, split's or chunk's input), else None."""
    node = _through_views(node)
    if isinstance(node, fx.Node) and node.target is aten.slice.Tensor:
        return node.args[0]
    if _is_getitem(node):
        return node.args[0].args[0] if isinstance(node.args[0], fx.Node) and node.args[0].args else None
    return None


def _describe_sum_rotation(turn: fx.Node) -> str:
    sub, _ = _sum_rotation(turn)
    (a, b), (c, d) = (m.args for m in sub.args)
    # x1*cos - x2*sin: the halves are the two factors cut from one tensor; else the larger ones
    x1, cos = next(((x1, cos) for x1, cos, x2 in ((a, b, c), (a, b, d), (b, a, c), (b, a, d))
                    if _source(x1) is not None and _source(x1) is _source(x2)),
                   sorted((a, b), key=lambda n: -_numel(n)))
    cut = _through_views(x1)
    steps = cut.args[4] if cut.target is aten.slice.Tensor and len(cut.args) > 4 else 1
    halves = "even/odd slices" if steps == 2 else "halves"
    joined = "cat" if turn.target is aten.cat.default else "stack"
    rotated = _source(x1)
    of = f" of {val(rotated)}" if rotated is not None else ""
    return (f"rotary rotation, {halves} without rotate_half (x1*cos - x2*sin, x2*cos + x1*sin, no -x2) into a "
            f"{joined},{of} with cos {val(cos)}")


def _describe_complex_rotation(mul: fx.Node) -> str:
    x = next(a for a in mul.args[:2] if isinstance(a, fx.Node)
             and _through_views(a).target is aten.view_as_complex.default)
    tables = next((a for a in mul.args[:2] if a is not x), None)
    pairs = _through_views(x).args[0]  # [..., d/2, 2], a view of the rotated tensor (maybe upcast first)
    source = pairs
    while isinstance(source, fx.Node) and source.target in _VIEWS + (aten._to_copy.default, aten.clone.default):
        source = source.args[0]
    v, s = pairs.meta.get("val"), source.meta.get("val") if isinstance(source, fx.Node) else None
    rotated = (f"{str(s.dtype).replace('torch.', '')} {list(v.shape[:-2]) + [v.shape[-2] * 2]}"
               if isinstance(v, torch.Tensor) and isinstance(s, torch.Tensor) and v.dim() >= 2 else "?")
    return (f"rotary rotation, complex multiply (view_as_complex) of {rotated} by {val(tables)}, "
            f"read back with view_as_real")


def describe_neg_rotation(neg: fx.Node) -> str:
    """'rotary rotation, <form>, of <tensor> with cos <table>' read off the graph around the `-x2`."""
    turn = next(u for u in neg.users if u.target in _CATS)
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
        parts.append(f"of {val(rotated)} with cos {val(cos)}")
    return ", ".join(parts)


def _follow_views(node: fx.Node) -> fx.Node:
    while len(node.users) == 1:
        (user,) = node.users
        if user.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            break
        node = user
    return node


# ---- the table explain.py reads -------------------------------------------------------------------------------

ANCHORS: Dict[str, Callable[[fx.Node], bool]] = {
    "moe_ffn": lambda n: is_expert_gemm(n) or is_dense_expert_gemm(n) or opaque_experts_op(n) is not None,
    "moe_gate": lambda n: n.target is aten.topk.default or is_router_without_topk(n),
    "add_rmsnorm": lambda n: n.target is aten.rsqrt.default,
    "norm_rope_gate": is_rotation,
}

# (is this kind of anchor, what it is, why no rule of the family takes it) for the spellings without a rule
_UNCOVERED = {
    "moe_ffn": [(lambda n: opaque_experts_op(n) is not None, _describe_opaque_experts,
                 "the experts are already one fused kernel of the serving framework: no expert GEMM in the graph "
                 "for a rule to take, and the op is left as it is"),
                (routed_without_router, _describe_routed_without_router,
                 "the router's top-k / sort is not in this graph (the graph broke between them, e.g. at a "
                 "data-dependent bincount or nonzero), and a rule needs both"),
                (lambda n: not is_expert_gemm(n), _describe_dense_experts,
                 "no pattern of the family covers dense experts weighted by anything but a top-1 router's "
                 "picks scattered into zeros (`dense_top1_bmm`, Llama4's form); its other rules take routed "
                 "experts: a grouped GEMM or weights gathered by expert id")],
    "moe_gate": [(lambda n: n.target is not aten.topk.default, _describe_router,
                  "no pattern of the family covers a router that picks its experts with max instead of top-k")],
    "norm_rope_gate": [(_is_neg_rotation, describe_neg_rotation, _NO_RULE),
                       (lambda n: _sum_rotation(n) is not None, _describe_sum_rotation, _NO_RULE),
                       (_is_complex_rotation, _describe_complex_rotation, _NO_RULE)],
}


def describe(family: str, anchor: fx.Node) -> Optional[Tuple[str, str]]:
    """(what the anchor is, why it stayed) for a spelling no rule of the family has; None for the others,
    whose near miss is the closest pattern's failure."""
    for kind, what, why in _UNCOVERED.get(family, ()):
        if kind(anchor):
            return what(anchor), why
    return None


def _is_getitem(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem


def val(node) -> str:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}"
    return "?"


def _numel(node) -> int:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v.numel() if isinstance(v, torch.Tensor) else 0


def op_name(target) -> str:
    name = getattr(target, "name", None)
    if callable(name):
        return name()
    return getattr(target, "__name__", str(target))
