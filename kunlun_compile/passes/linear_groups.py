"""group_linears: kunlun::linear calls that read the same input -> one kunlun::linear_group launch.

At decode sizes each linear is a short GEMV whose launch ramp (~1-2 µs inside a CUDA graph) is a
large part of its time.  Siblings of one input are common: Qwen3-Next's MoE block reads its normed
hidden state with the router, the shared expert's gate|up projection and the shared expert's gate;
DeepSeek-style blocks with the router and the shared expert.  One launch then spreads the programs
of all of them over the GPU.  Linears with a bias are left alone (none of the built-in models has
one next to a sibling), as is a linear whose weight is computed after the group's first member.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Dict, List

import torch
import torch.fx as fx

from ..ops.linear import MAX_GROUP
from .manager import PassContext, PassOutcome


def _bias(node: fx.Node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def group_linears(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    linear = torch.ops.kunlun.linear.default
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_input: Dict[fx.Node, List[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is linear and _bias(n) is None:
            by_input[n.args[0]].append(n)
    groups = 0
    for x, members in by_input.items():
        first = members[0]
        members = [m for m in members if not isinstance(m.args[1], fx.Node) or order[m.args[1]] < order[first]]
        for i in range(0, len(members), MAX_GROUP):
            chunk = members[i:i + MAX_GROUP]
            if len(chunk) < 2:
                continue
            with gm.graph.inserting_before(chunk[0]):
                group = gm.graph.call_function(torch.ops.kunlun.linear_group.default,
                                               (x, [m.args[1] for m in chunk]))
                group.meta["val"] = [m.meta["val"] for m in chunk]
                items = [gm.graph.call_function(operator.getitem, (group, j)) for j in range(len(chunk))]
            for m, item in zip(chunk, items):  # erased only now: chunk[0] anchored the insertions
                item.meta["val"] = m.meta["val"]
                m.replace_all_uses_with(item)
                gm.graph.erase_node(m)
            groups += 1
    return PassOutcome(matches=groups)
