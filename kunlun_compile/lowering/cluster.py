"""Group connected element-wise nodes into clusters, one generated kernel each.

A cluster is a set of lowerable nodes (isel.why_not_lowerable) joined
producer -> consumer, with one iteration space (the result shape, symbolic
sizes compared as expressions):
- a producer of the same shape joins its consumer's cluster;
- a producer of a smaller shape that broadcasts to the consumer's (`pos[:, None].float()`
  before `* inv_freq`; a gate `sigmoid(g)` of [T, 1] before `* y`) is recomputed inside
  the consumer's kernel when nothing else uses it and it is cheap (at most
  `MAX_INLINED_MATH` math functions): that saves a kernel and a round trip through
  memory for a few instructions per element;
- siblings (same shape, a shared input, no path between them: `cos(x)`, `sin(x)`)
  become one kernel with several outputs, reading the input once.
Merging is refused when it would create a cycle: when one cluster reaches the
other through something outside both (the merged kernel would need its own
output as an input).  A value a cluster computes and something else needs is
an extra output of that cluster.  Clusters end at everything that is not
element-wise: reductions, matmuls, fused kunlun:: ops, views that change the
iteration space, graph outputs (stored, like any other outside use).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import networkx as nx
import torch
import torch.fx as fx

from .isel import ClusterSpec, is_cheap, reads_values, why_not_lowerable


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

    members: Dict[fx.Node, List[fx.Node]] = {n: [n] for n in lowerable}
    space: Dict[fx.Node, Tuple] = dict(lowerable)  # representative -> its cluster's iteration space

    def merge(keep: fx.Node, gone: fx.Node, shape: Tuple) -> None:
        nx.contracted_nodes(dag, keep, gone, self_loops=False, copy=False)
        rep[gone] = keep
        members[keep] += members.pop(gone)
        space[keep] = shape

    for n in nodes:
        if n not in lowerable or not reads_values(n):
            continue
        for a in n.all_input_nodes:
            if a not in lowerable:
                continue
            pa, pn = find(a), find(n)
            if pa is pn:
                continue
            if space[pa] == space[pn]:
                if not _creates_cycle(dag, pa, pn):
                    merge(pa, pn, space[pn])
            elif _inlinable(members[pa], space[pa], space[pn], members[pn]) and not _creates_cycle(dag, pa, pn):
                merge(pn, pa, space[pn])

    _fuse_siblings(dag, members, space, order)
    specs = [_spec(sorted(group, key=order.get), order, space[r]) for r, group in members.items()]
    specs = [s for s in specs if s is not None]
    specs.sort(key=lambda s: order[s.nodes[0]])
    return specs, refused


def _broadcasts_to(small: Tuple, big: Tuple) -> bool:
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(small[::-1], big[::-1]))


# Math functions a broadcast producer may bring into each element of its consumer.  The consumer is
# memory-bound: an H100 streams ~0.5 G elements/ms through a 2-in/1-out bf16 kernel while its SFUs
# do ~3.6 G exp/ms, so one or two more per element stay hidden; a separate kernel costs a launch
# (~1 µs inside a CUDA graph: Qwen3-Next's shared-expert gate, `sigmoid(x @ w_g) * y`).
MAX_INLINED_MATH = 2


def _inlinable(producers: List[fx.Node], small: Tuple, big: Tuple, consumers: List[fx.Node]) -> bool:
    """A smaller producer cluster can be recomputed per element of the consumer's space: it broadcasts there,
    every use of it is in the consumer's cluster, and it is cheap."""
    if not _broadcasts_to(small, big):
        return False
    inside = set(producers) | set(consumers)
    math = sum(not is_cheap(p) for p in producers)
    return math <= MAX_INLINED_MATH and all(u in inside for p in producers for u in p.users)


def _fuse_siblings(dag: nx.DiGraph, members: Dict[fx.Node, List[fx.Node]], space: Dict[fx.Node, Tuple],
                   order: Dict[fx.Node, int]) -> None:
    """Merge clusters of the same space that read a common input and do not depend on each other."""
    def reads(r: fx.Node) -> set:
        inside = set(members[r])
        return {a for n in members[r] if reads_values(n) for a in n.all_input_nodes if a not in inside}

    changed = True
    while changed:
        changed = False
        reps = sorted(members, key=lambda r: order[members[r][0]])
        for i, a in enumerate(reps):
            for b in reps[i + 1:]:
                if space[a] != space[b] or not (reads(a) & reads(b)):
                    continue
                if nx.has_path(dag, a, b) or nx.has_path(dag, b, a):
                    continue
                nx.contracted_nodes(dag, a, b, self_loops=False, copy=False)
                members[a] += members.pop(b)
                changed = True
                break
            if changed:
                break


def _creates_cycle(dag: nx.DiGraph, producer: fx.Node, consumer: fx.Node) -> bool:
    """True if `consumer` is reachable from `producer` other than by their direct edge."""
    for s in dag.successors(producer):
        if s is not consumer and nx.has_path(dag, s, consumer):
            return True
    return False


def _spec(group: List[fx.Node], order: Dict[fx.Node, int], shape: Tuple) -> Optional[ClusterSpec]:
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
    return ClusterSpec(group, inputs, outputs, len(shape))
