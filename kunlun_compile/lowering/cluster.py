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
- a reduction (isel_reduce.py) makes its cluster a row kernel over the reduction's input
  shape with one reduced dim: element-wise producers of that shape and consumers of that
  shape or of the per-row shape (the reduced dim kept as 1) join it, and so do other
  reductions over the same dim of the same shape (softmax spelled out: amax, exp, sum).
  Producers and consumers that index (an embedding gather before a norm, the shifted
  positions before a cumsum) join it too: the row kernel then reads at index expressions.
Merging is refused when it would create a cycle: when one cluster reaches the
other through something outside both (the merged kernel would need its own
output as an input).  A value a cluster computes and something else needs is
an extra output of that cluster.  Clusters end at everything else:
matmuls, fused kunlun:: ops, indexing, views that change the iteration space,
reductions of another dim or shape, graph outputs (stored, like any other
outside use).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import networkx as nx
import torch
import torch.fx as fx

from .cluster_isel import ClusterSpec
from .isel import is_cheap, is_contiguous, reads_values, why_not_lowerable
from .isel_index import DUPLICATING, is_gather_table, is_index_op, is_scatter_store, is_view
from .isel_reduce import is_reduction, is_result_of_reduction, row_space
from .recompute import recompute_in_readers

# A cluster's space: ("pw", shape) for element-wise work, ("row", shape, dim) for a row kernel
# reducing `dim` of `shape`.
Space = Tuple


def iteration_space(node: fx.Node) -> Tuple:
    return _exprs(node.meta["val"].shape)


def _exprs(shape) -> Tuple:
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in shape)


def node_space(node: fx.Node) -> Space:
    if is_result_of_reduction(node):
        node = node.args[0]
    if is_reduction(node):
        shape, dim = row_space(node)
        return ("row", _exprs(shape), dim)
    if is_index_op(node) or (isinstance(node.meta["val"], torch.Tensor) and not is_contiguous(node.meta["val"])):
        # indexed reads, or a result in a permuted layout: element-wise kernels only, no row kernel takes it
        return ("pwi", iteration_space(node))
    return ("pw", iteration_space(node))


def joined(a: Space, b: Space) -> Optional[Space]:
    """The space of one cluster doing the work of clusters in spaces `a` and `b`, None if there is none."""
    if a == b:
        return a
    if a[0] == "row" and b[0] == "row":
        return None
    if a[0] != "row" and b[0] != "row":
        return ("pwi" if "pwi" in (a[0], b[0]) else "pw", a[1]) if a[1] == b[1] else None
    row, pw = (a, b) if a[0] == "row" else (b, a)
    shape, dim = row[1], row[2]
    per_row = tuple(1 if d == dim else s for d, s in enumerate(shape))
    return row if pw[1] in (shape, per_row) else None


def shape_of(space: Space) -> Tuple:
    return space[1]


def find_clusters(gm: fx.GraphModule, lowers: Optional[Callable[[ClusterSpec], bool]] = None
                  ) -> Tuple[List[ClusterSpec], List[str]]:
    """The clusters of `gm` (in graph order) and one line per element-wise-looking node left out.

    A row kernel that took indexing neighbours is tried at once (`lowers`): where it reads a reduction at
    rows other than its own (a cumsum rolled by a `cat`, a row sum read at the next row), it cannot be
    one kernel, and its nodes are clustered again without such joins (as separate kernels, through memory).
    """
    plain_rows: Set[fx.Node] = set()
    for _ in range(4):
        specs, refused = _find_clusters(gm, plain_rows)
        failed = [s for s in specs if lowers is not None and s.reduce_dim is not None
                  and any(is_index_op(n) for n in s.nodes) and not set(s.nodes) <= plain_rows and not lowers(s)]
        if not failed:
            break
        for s in failed:
            plain_rows.update(s.nodes)
    return specs, refused


def _find_clusters(gm: fx.GraphModule, plain_rows: Set[fx.Node]) -> Tuple[List[ClusterSpec], List[str]]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    lowerable: Dict[fx.Node, Space] = {}
    refused: List[str] = []
    for n in nodes:
        reason = why_not_lowerable(n)
        if reason is None:
            lowerable[n] = node_space(n)
        elif n.op == "call_function" and reason != "not an element-wise op in the lowering table":
            refused.append(f"{n.name} ({n.target}): {reason}")
    _keep_views_between_lowered_nodes(lowerable)

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
    space: Dict[fx.Node, Space] = dict(lowerable)  # representative -> its cluster's space

    def merge(keep: fx.Node, gone: fx.Node, shape: Tuple) -> None:
        nx.contracted_nodes(dag, keep, gone, self_loops=False, copy=False)
        rep[gone] = keep
        members[keep] += members.pop(gone)
        space[keep] = shape

    def merge_along(n: fx.Node, a: fx.Node) -> bool:
        pa, pn = find(a), find(n)
        # a gather reads its table at data-dependent rows: from memory, unless the table is a few vector
        # instructions of static shape (recomputed at each gathered row) or joins the kernel another way
        if pa is pn or (is_gather_table(n, a) and not _cheap_static_table(members[pa], a)):
            return False
        if is_scatter_store(a):  # what it writes at data-dependent ids is read from memory, after the kernel
            return False
        both = joined(space[pa], space[pn])
        if both is not None and not _row_takes(members[pa], members[pn], (space[pa][0], space[pn][0]), plain_rows):
            both = None
        if both is not None:
            if _creates_cycle(dag, pa, pn):
                return False
            merge(pa, pn, both)
        elif _reindexable(n, members[pa], space[pa], members[pn], space[pn]) \
                and _row_takes(members[pa], members[pn], ("pwi", space[pn][0]), plain_rows) \
                and not _creates_cycle(dag, pa, pn):
            merge(pn, pa, space[pn] if space[pn][0] == "row" else ("pwi", shape_of(space[pn])))
        elif (through := _row_through(n, members[pa], space[pa], members[pn], space[pn])) is not None \
                and _row_takes(members[pa], members[pn], ("row", "pwi"), plain_rows) \
                and not _creates_cycle(dag, pa, pn):
            merge(pn, pa, through)
        elif space[pa][0] in ("pw", "pwi") and _row_takes(members[pa], members[pn], (space[pa][0], space[pn][0]),
                                                          plain_rows) \
                and _inlinable(
                members[pa], shape_of(space[pa]), shape_of(space[pn]), members[pn]) \
                and not _creates_cycle(dag, pa, pn):
            merge(pn, pa, space[pn] if space[pa][0] == "pw" or space[pn][0] == "row" else ("pwi", shape_of(space[pn])))
        else:
            return False
        return True

    # producer -> consumer edges in graph order; again while a round merges (a merge refused for a cycle
    # through a third cluster can become possible once that cluster has joined one of the two)
    for _ in range(4):
        merged = False
        for n in nodes:
            if n in lowerable and reads_values(n):
                for a in n.all_input_nodes:
                    if a in lowerable:
                        merged |= merge_along(n, a)
        if not merged:
            break

    def adopt(n: fx.Node, r: fx.Node) -> None:
        rep[n] = r

    recompute_in_readers(gm.graph, members, space, order, dag, find, adopt, MAX_INLINED_MATH)
    _fuse_siblings(dag, members, space, order, plain_rows)
    specs = [_spec(sorted(group, key=order.get), order, space[r]) for r, group in members.items()]
    specs = [s for s in specs if s is not None]
    specs.sort(key=lambda s: order[s.nodes[0]])
    return specs, refused


def _row_takes(a: List[fx.Node], b: List[fx.Node], kinds: Tuple[str, str], plain_rows: Set[fx.Node]) -> bool:
    """Whether clusters `a` and `b` (of space kinds `kinds`) may merge.  A row kernel joins an indexing cluster
    (gathers, views, cat: evaluated at maps, reindex.py) unless it would write values at ids (a scatter store)
    or such a kernel was tried and refused (`plain_rows`); any other pair is not this rule's business."""
    if set(kinds) != {"row", "pwi"}:
        return True
    inside = set(a) | set(b)
    return not (inside & plain_rows) and not any(is_scatter_store(n) for n in inside)


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


def _keep_views_between_lowered_nodes(lowerable: Dict[fx.Node, Space]) -> None:
    """A view is worth lowering only between a value a kernel computes and a kernel that reads it; a view
    of a tensor in memory is read through its strides, and a view nothing lowered reads stays a view."""
    changed = True
    while changed:
        changed = False
        for n in list(lowerable):
            if is_view(n) and (n.args[0] not in lowerable or not any(u in lowerable for u in n.users)):
                del lowerable[n]
                changed = True


def _reindexable(n: fx.Node, producers: List[fx.Node], producer_space: Space, consumers: List[fx.Node],
                 consumer_space: Space) -> bool:
    """A producer cluster read only through the index node `n` (a view, cat branch or gathered ids) is
    evaluated at the coordinates `n` reads, inside n's kernel; when `n` may read one element several times
    (expand, gathers) only if it is cheap."""
    if not is_index_op(n) or is_scatter_store(n) or producer_space[0] == "row":
        return False
    inside = set(producers) | set(consumers)
    # what else reads a producer is stored by the kernel, at the kernel's point: it must have that shape
    # (in a row kernel, the per-row shape too)
    read_outside = [p for p in producers if any(u not in inside for u in p.users)]
    shapes = [shape_of(consumer_space)]
    if consumer_space[0] == "row":
        shapes.append(tuple(1 if d == consumer_space[2] else x for d, x in enumerate(consumer_space[1])))
    if not all(iteration_space(p) in shapes for p in read_outside):
        return False
    return n.target not in DUPLICATING or sum(not is_cheap(p) for p in producers) <= MAX_INLINED_MATH


def _row_through(n: fx.Node, producers: List[fx.Node], producer_space: Space, consumers: List[fx.Node],
                 consumer_space: Space) -> Optional[Space]:
    """A row kernel read through the index node `n` (a transpose of the heads, the slices and `cat` of a
    rotation) by element-wise consumers of the same row length: one row kernel over the consumers' space,
    reducing its last dim, that evaluates the row values at the coordinates `n` reads (the same row, other
    positions along it; reindex.py checks and the lowering is tried, cluster.find_clusters).  Returns that
    space, or None."""
    if producer_space[0] != "row" or consumer_space[0] == "row" or not is_index_op(n) or is_scatter_store(n):
        return None
    shape, dim = producer_space[1], producer_space[2]
    big = shape_of(consumer_space)
    if dim != len(shape) - 1 or not big or big[-1] != shape[-1] or big[-1] == 1:
        return None
    inside = set(producers) | set(consumers)
    per_row = big[:-1] + (1,)
    if not all(iteration_space(p) in (big, per_row) for p in producers if any(u not in inside for u in p.users)):
        return None
    if n.target in DUPLICATING and sum(not is_cheap(p) for p in producers) > MAX_INLINED_MATH:
        return None
    return ("row", big, len(big) - 1)


def _cheap_static_table(producers: List[fx.Node], table: fx.Node) -> bool:
    return all(is_cheap(p) and not is_reduction(p) for p in producers) and all(
        isinstance(s, int) for s in table.meta["val"].shape)


def _device_anchor(order: Dict[fx.Node, int], out: fx.Node) -> Optional[fx.Node]:
    """A graph input on `out`'s device, passed to a kernel that reads nothing (it is never loaded)."""
    device = out.meta["val"].device
    for n in order:
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device == device:
            return n
    return None


def _fuse_siblings(dag: nx.DiGraph, members: Dict[fx.Node, List[fx.Node]], space: Dict[fx.Node, Space],
                   order: Dict[fx.Node, int], plain_rows: Set[fx.Node]) -> None:
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
                both = joined(space[a], space[b])
                if both is None or not _row_takes(members[a], members[b], (space[a][0], space[b][0]), plain_rows) \
                        or not (reads(a) & reads(b)):
                    continue
                if nx.has_path(dag, a, b) or nx.has_path(dag, b, a):
                    continue
                nx.contracted_nodes(dag, a, b, self_loops=False, copy=False)
                members[a] += members.pop(b)
                space[a] = both
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


def _spec(group: List[fx.Node], order: Dict[fx.Node, int], space: Space) -> Optional[ClusterSpec]:
    inside = set(group)
    inputs: List[fx.Node] = []
    for n in group:
        if not reads_values(n):
            continue
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs and not (is_scatter_store(n) and a is n.args[0]) \
                    and isinstance(a.meta.get("val"), torch.Tensor):
                inputs.append(a)  # (not a scatter's fresh base: the kernel allocates its output; not arange's
                # symbolic end: it only sizes the space, given to the kernel as a shape argument)
    outputs = [n for n in group if any(u not in inside for u in n.users)]
    if not outputs:
        return None  # dead code: the dead_code pass's business
    if not inputs:
        # computed from shapes and coordinates alone (a sliding-window mask from arange): a kernel still needs
        # a tensor for its device; fills alone are nothing worth a kernel
        anchor = _device_anchor(order, outputs[0]) if not all(not reads_values(n) for n in group) else None
        if anchor is None:
            return None
        inputs = [anchor]
    if space[0] != "row":
        if all(is_view(n) for n in group):
            return None  # views alone: no work for a kernel
        return ClusterSpec(group, inputs, outputs, len(space[1]))
    reduction = next(n for n in group if is_reduction(n))
    # the space with its SymInts: the reduction's input shape, or (a row read through a view) a member's
    shape = next((tuple(n.meta["val"].shape) for n in [reduction.args[0]] + group
                  if isinstance(n.meta.get("val"), torch.Tensor) and _exprs(n.meta["val"].shape) == space[1]),
                 row_space(reduction)[0])
    return ClusterSpec(group, inputs, outputs, len(space[1]), space[2], shape)
