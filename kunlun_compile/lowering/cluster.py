"""Group connected element-wise nodes into clusters, one generated kernel each.

A cluster is a set of lowerable nodes (isel.why_not_lowerable) with the same
iteration space (result shape, symbolic sizes compared as expressions), joined
producer -> consumer.  Merging two clusters is refused when it would create a
cycle: when the producer's cluster reaches the consumer's through something
outside both (the merged kernel would need its own output as an input).
Nothing is duplicated: a value a cluster computes and something else needs is
an extra output of that cluster.  Clusters end at everything that is not
element-wise: reductions, matmuls, fused kunlun:: ops, views that change the
iteration space, graph outputs (stored, like any other outside use).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import networkx as nx
import torch
import torch.fx as fx

from .isel import ClusterSpec, reads_values, why_not_lowerable


def iteration_space(node: fx.Node) -> Tuple:
    val = node.meta["val"]
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in val.shape)


def find_clusters(gm: fx.GraphModule) -> Tuple[List[ClusterSpec], List[str]]:
    """The clusters of `gm` (in graph order) and one line per element-wise-looking node left out."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    lowerable: Dict[fx.Node, Tuple] = {}
    refused: List[str] = []
    for n in nodes:
        reason = why_not_lowerable(n)
        if reason is None:
            lowerable[n] = iteration_space(n)
        elif n.op == "call_function" and reason != "not an element-wise op in the lowering table":
            refused.append(f"{n.name} ({n.target}): {reason}")

    dag = nx.DiGraph()
    dag.add_nodes_from(nodes)
    dag.add_edges_from((a, n) for n in nodes for a in n.all_input_nodes)
    rep: Dict[fx.Node, fx.Node] = {n: n for n in nodes}  # node -> its cluster's representative in `dag`

    def find(n: fx.Node) -> fx.Node:
        while rep[n] is not n:
            rep[n] = rep[rep[n]]
            n = rep[n]
        return n

    for n in nodes:
        if n not in lowerable:
            continue
        for a in n.all_input_nodes:
            if a not in lowerable or lowerable[a] != lowerable[n] or not reads_values(n):
                continue
            pa, pn = find(a), find(n)
            if pa is pn or _creates_cycle(dag, pa, pn):
                continue
            nx.contracted_nodes(dag, pa, pn, self_loops=False, copy=False)
            rep[pn] = pa

    members: Dict[fx.Node, List[fx.Node]] = {}
    for n in lowerable:
        members.setdefault(find(n), []).append(n)
    specs = [_spec(sorted(group, key=order.get), order) for group in members.values()]
    specs = [s for s in specs if s is not None]
    specs.sort(key=lambda s: order[s.nodes[0]])
    return specs, refused


def _creates_cycle(dag: nx.DiGraph, producer: fx.Node, consumer: fx.Node) -> bool:
    """True if `consumer` is reachable from `producer` other than by their direct edge."""
    for s in dag.successors(producer):
        if s is not consumer and nx.has_path(dag, s, consumer):
            return True
    return False


def _spec(group: List[fx.Node], order: Dict[fx.Node, int]) -> Optional[ClusterSpec]:
    inside = set(group)
    inputs: List[fx.Node] = []
    for n in group:
        if not reads_values(n):
            continue
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    if not inputs:
        return None  # constants only: nothing to read, nothing worth a kernel
    outputs = [n for n in group if any(u not in inside for u in n.users)]
    if not outputs:
        return None  # dead code: the dead_code pass's business
    return ClusterSpec(group, inputs, outputs, len(group[0].meta["val"].shape))
