"""The element-wise lowering pass: clusters -> KIR -> one `kunlun::pointwise` call each.

Runs after the fusion passes, on what they left.  Each cluster (lowering/
cluster.py) is lowered to KIR for the configured target and accuracy policy,
registered in the kernel cache, and replaced by one `kunlun::pointwise` node
whose outputs take the place of the cluster's outside-used values.  A cluster
that cannot be lowered stays as ATen ops, with the reason as a near miss.
The shape argument is symbolic (read off an input with `sym_size`), so one
kernel serves every batch size.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
try:  # keeps the original order where it can (readable diffs, stable pieces); older torch: plain topo sort
    from torch.fx.passes.tools_common import stable_topological_sort as topological_sort
except ImportError:  # pragma: no cover
    from torch.fx.passes.tools_common import legalize_graph as topological_sort

from ..lowering.cache import register
from ..lowering.cluster import ClusterSpec, find_clusters
from ..lowering.isel import Policy, Refused, lower_cluster
from ..lowering.targets import get_target
from .manager import PassContext, PassOutcome
from .rewrites import mark_replacement, rewrite_allowed

POINTWISE_OP = torch.ops.kunlun.pointwise.default


def lower_elementwise(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    target = get_target(ctx.config.target)
    policy = Policy(fast_math=ctx.config.fast_math)
    clusters, refused = find_clusters(gm)
    outcome = PassOutcome(near_misses=[f"element-wise node left as ATen: {r}" for r in refused])
    replaced = {}  # an earlier cluster's output node -> the getitem that now stands for it
    for spec in clusters:
        spec.inputs = [replaced.get(x, x) for x in spec.inputs]
        try:
            kir = lower_cluster(spec, target, policy)
            shape = _shape_args(gm.graph, spec)
        except Refused as e:
            outcome.near_misses.append(f"cluster at {spec.nodes[0].name} ({len(spec.nodes)} ops): {e}")
            continue
        if not rewrite_allowed(f"{len(spec.nodes)} element-wise ops from {spec.nodes[0].name} -> one generated "
                               f"kernel", spec.nodes):
            continue
        replaced.update(_replace(gm.graph, spec, register(kir), shape))
        outcome.matches += 1
    if outcome.matches:
        topological_sort(gm)  # an output's new getitem may sit after a user of the old node: reorder first
    # shape-only sources of fills (zeros_like(x) under fill) and sym_size nodes of a refused cluster
    gm.graph.eliminate_dead_code()
    return outcome


def _shape_args(graph: fx.Graph, spec: ClusterSpec) -> List[Any]:
    """The iteration shape as ints and `sym_size` nodes of an input (inserted after that input)."""
    shape = spec.outputs[0].meta["val"].shape
    out: List[Any] = []
    for d, size in enumerate(shape):
        if not isinstance(size, torch.SymInt):
            out.append(int(size))
            continue
        src = _input_dim_with(spec, size.node.expr, len(shape) - d)
        if src is None:
            raise Refused(f"no input has the symbolic size {size} of dim {d}")
        node, dim = src
        with graph.inserting_after(node):
            sym = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
        sym.meta["val"] = size
        out.append(sym)
    return out


def _input_dim_with(spec: ClusterSpec, expr, from_end: int) -> Optional[tuple]:
    for x in spec.inputs:
        val = x.meta["val"]
        d = val.dim() - from_end
        if d >= 0 and isinstance(val.shape[d], torch.SymInt) and val.shape[d].node.expr == expr:
            return x, d
    return None


def _replace(graph: fx.Graph, spec: ClusterSpec, key: str, shape: List[Any]) -> Dict[fx.Node, fx.Node]:
    last = spec.nodes[-1]
    with graph.inserting_after(last):
        call = graph.call_function(POINTWISE_OP, (list(spec.inputs), shape, key))
    call.meta["val"] = [n.meta["val"] for n in spec.outputs]
    call.meta["kunlun_lowered_from"] = [n.name for n in spec.nodes]
    items = {}
    for k, n in enumerate(spec.outputs):
        with graph.inserting_after(call):
            item = graph.call_function(operator.getitem, (call, k))
        item.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(item)
        mark_replacement(n, item)
        items[n] = item
    for n in reversed(spec.nodes):
        graph.erase_node(n)
    return items
