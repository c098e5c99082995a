"""Arithmetic in one spelling while the fusion passes match, and back where nothing fused it.

Model code writes the same RMSNorm many ways: `x.pow(2)` or `x * x` or `x.square()`, `.mean(-1)` or
`.sum(-1) / n`, `torch.rsqrt(v)` or `torch.sqrt(v).reciprocal()` or `x / torch.sqrt(v)`.  The rules' patterns spell
one of each; `normalise` rewrites the graph to that spelling before matching (applied with `canonical.py`
to graphs and patterns alike), marking every node it rewrote with how it was written.  The rewrites are
equal in meaning, not always in bits (`rsqrt` and `1 / sqrt` may round differently on the GPU; a mean may
divide or multiply by 1/n), so after the fusion passes `restore` puts every marked node that survived --
nothing fused it -- back the way the model wrote it: code that does not fuse keeps eager's numbers.
The fused kernels are held to the dtype's tolerance against float64, as for any other spelling.

    a * a                      -> a.pow(2)                  (exact)
    x.sum(dims, keepdim) / n   -> x.mean(dims, keepdim)     float32 x, n the number of summed elements
    reciprocal(sqrt(v))        -> rsqrt(v)
    x / sqrt(v)                -> x * rsqrt(v)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from ..utils import recompile
from .manager import PassContext, PassOutcome

aten = torch.ops.aten
MARK = "kunlun_algebra"  # node.meta key: how the model wrote the node (a tuple; see `restore`)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _only_use(node: fx.Node, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and set(node.users) == {user}


def _square(node: fx.Node) -> bool:
    """Float tensors only: `pow` of a bool tensor (a logical and with itself) is no such thing."""
    v = _val(node)
    if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
        return False
    if node.target is aten.mul.Tensor and len(node.args) == 2 and node.args[0] is node.args[1] and not node.kwargs:
        x = node.args[0]
        node.target, node.args = aten.pow.Tensor_Scalar, (x, 2)
        node.meta[MARK] = ("mul_self",)
        return True
    return False


def _summed_count(x: torch.Tensor, dims):
    dims = [dims] if isinstance(dims, int) else list(dims or range(x.dim()))
    sizes = [x.shape[d] for d in dims]
    return math.prod(sizes) if all(isinstance(s, int) for s in sizes) else None


def _mean(node: fx.Node) -> bool:
    if node.target is not aten.div.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    total, n = node.args
    if not (isinstance(n, (int, float)) and not isinstance(n, bool) and isinstance(total, fx.Node)
            and total.target is aten.sum.dim_IntList and "dtype" not in total.kwargs and _only_use(total, node)):
        return False
    x, dims = total.args[0], total.args[1]
    keepdim = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
    xv = _val(x)
    if not (isinstance(xv, torch.Tensor) and xv.dtype == torch.float32 and _summed_count(xv, dims) == n):
        return False
    node.target, node.args = aten.mean.dim, (x, dims, keepdim)
    node.meta[MARK] = ("sum_div", n)
    return True


def _reciprocal_sqrt(node: fx.Node) -> bool:
    root = node.args[0] if node.args else None
    if node.target is not aten.reciprocal.default or not (isinstance(root, fx.Node) and
                                                          root.target is aten.sqrt.default and _only_use(root, node)):
        return False
    node.target, node.args = aten.rsqrt.default, (root.args[0],)
    node.meta[MARK] = ("reciprocal_sqrt",)
    return True


def _divide_by_sqrt(node: fx.Node) -> bool:
    if node.target is not aten.div.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    x, root = node.args
    if not (isinstance(x, fx.Node) and isinstance(root, fx.Node) and root.target is aten.sqrt.default
            and _only_use(root, node)):
        return False
    root.target = aten.rsqrt.default  # same shape and dtype: its meta holds
    node.target = aten.mul.Tensor
    node.meta[MARK] = ("div_sqrt",)
    root.meta[MARK] = ("rsqrt_of_div",)
    return True


_RULES = (_square, _mean, _reciprocal_sqrt, _divide_by_sqrt)


def normalise(gm: fx.GraphModule) -> int:
    """Rewrite `gm`'s arithmetic into the patterns' spelling, in place; returns the edits.  One sweep is the
    fixpoint: no rule's result is another rule's input (a rewritten node's old operands are left dead)."""
    edits = sum(1 for node in gm.graph.nodes if node.op == "call_function" and any(rule(node) for rule in _RULES))
    if edits:
        gm.graph.eliminate_dead_code()
    return edits


def restore(gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> PassOutcome:
    """Every marked node still in the graph (no fusion took it) back as the model wrote it.  `x / sqrt(v)`
    became two nodes: they go back together, only while both are there and still each other's (a fusion
    that took one and kept the other as its input keeps the `x * rsqrt(v)` form: equal in meaning)."""
    restored = 0
    for node in list(gm.graph.nodes):
        how = node.meta.get(MARK)
        if how is None:
            continue
        if how[0] == "rsqrt_of_div":  # handled with its user, below
            continue
        del node.meta[MARK]
        if how[0] == "div_sqrt":
            root = node.args[1]
            if not (isinstance(root, fx.Node) and root.meta.get(MARK) == ("rsqrt_of_div",)
                    and set(root.users) == {node}):
                continue
            del root.meta[MARK]
            root.target = aten.sqrt.default
        restored += 1
        if how[0] == "mul_self":
            node.target, node.args = aten.mul.Tensor, (node.args[0], node.args[0])
        elif how[0] == "sum_div":
            x, dims, keepdim = node.args
            with gm.graph.inserting_before(node):
                total = gm.graph.call_function(aten.sum.dim_IntList, (x, dims, keepdim))
            total.meta["val"] = _val(node)
            node.target, node.args = aten.div.Tensor, (total, how[1])
        elif how[0] == "reciprocal_sqrt":
            with gm.graph.inserting_before(node):
                root = gm.graph.call_function(aten.sqrt.default, (node.args[0],))
            root.meta["val"] = _val(node)
            node.target, node.args = aten.reciprocal.default, (root,)
        elif how[0] == "div_sqrt":
            node.target = aten.div.Tensor
    for node in gm.graph.nodes:  # an rsqrt whose division a fusion took stays an rsqrt
        node.meta.pop(MARK, None)
    recompile(gm)
    return PassOutcome(matches=restored)
