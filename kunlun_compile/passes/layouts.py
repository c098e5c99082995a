"""Views that the rewrites may have made unsafe become reshapes.

A traced graph decides `view` against the strides its values had at trace time.  A fused
`kunlun::` op writes a fresh contiguous result where the ops it replaced may have produced
another layout (element-wise ops follow their input's), and ops downstream (attention,
transposes) pass the new layout on.  A `view` there can then fail at run time ("view size is not
compatible ... use .reshape") although eager, which decides per call, runs fine.

So every `view` whose input depends on a fused op's result through other ops becomes `reshape`,
which is the same view when the layout allows it and a copy when it does not.  A `view` taken
straight of a fused op's result stays: that result is contiguous, and any view of a contiguous
tensor with the same number of elements is valid.  Values that depend on graph inputs only keep
the layouts they were traced with.  A primitive put back as its reference (`RELAID` on the nodes it
became) is treated as a fused op whose layout is not known: views of it become reshapes too.
"""
from __future__ import annotations

import operator
from typing import Set

import torch
import torch.fx as fx

from ..utils import recompile
from .manager import PassContext, PassOutcome

aten = torch.ops.aten

_VIEWS = (aten.view.default, aten._unsafe_view.default)
RELAID = "kunlun_relaid"  # node meta: computed by a rewrite whose result's layout may differ from the traced one


def _is_fused_op(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "kunlun"


def _fresh(node: fx.Node) -> bool:
    """A fused op's result (or one element of its results): contiguous, as its fake says."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_fused_op(node.args[0])
    return _is_fused_op(node)


def views_after_fused_ops(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    relaid: Set[fx.Node] = set()  # values whose layout may differ from the traced one
    changed = 0
    for node in gm.graph.nodes:  # topological order
        inputs = node.all_input_nodes
        if _fresh(node):
            continue
        if node.target in _VIEWS and inputs and inputs[0] in relaid:
            node.target = aten.reshape.default
            changed += 1
        if node.meta.get(RELAID) or any(_fresh(i) or i in relaid for i in inputs):
            relaid.add(node)
    if changed:
        recompile(gm)
    return PassOutcome(matches=changed)  # not a fusion family: no pattern counts
