"""Recomputing a cheap producer inside each kernel that reads it, instead of storing it once.

HF's rotary tables (`cos(freqs)`, `sin(freqs)` of [B, S, D], unsqueezed for the heads) are read by the q
and the k rotation, two kernels over [B, H, S, D].  Stored, they cost a kernel of their own (a launch and a
round trip through memory); recomputed, each rotation evaluates them per element, as inductor does.  The
cost rule is the one for a single reader (cluster.MAX_INLINED_MATH): a producer cluster of at most that
many math functions (no reduction), whose every value is read by other generated kernels only, by
broadcast or through views (not as a gather's table: those rows are read from memory).  Each reader
gets its own copy of the producer's nodes it needs (fx node copies, in place after the originals); the
originals are left without users (dead code).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import networkx as nx
import torch.fx as fx

from .isel import is_cheap
from .isel_index import SCATTER_STORES, is_gather_table


def recompute_in_readers(graph: fx.Graph, members: Dict[fx.Node, List[fx.Node]], space: Dict[fx.Node, tuple],
                         order: Dict[fx.Node, float], dag: nx.DiGraph, find: Callable[[fx.Node], fx.Node],
                         adopt: Callable[[fx.Node, fx.Node], None], max_math: int) -> None:
    """`find` gives a node's cluster (its representative); `adopt(node, rep)` puts a new node in a cluster."""
    # until nothing changes: a reader that took a copy may itself be cheap and read by several kernels (the
    # cos/sin rows a gather picks, sliced into halves, each half read by the q and the k rotation)
    # clusters that took a copy: one read by a single, larger kernel now moves into it (it was kept apart only
    # by the producer it shared)
    received: set = set()
    for _ in range(4):
        if not _one_round(graph, members, space, order, dag, find, adopt, max_math, received):
            return


def _one_round(graph, members, space, order, dag, find, adopt, max_math, received: set) -> bool:
    changed = False
    for r in list(members):
        group = members.get(r)
        if group is None or space[r][0] == "row" or sum(not is_cheap(p) for p in group) > max_math:
            continue
        inside = set(group)
        readers = {find(u) for p in group for u in p.users if u not in inside}
        if not readers or any(c not in members for c in readers):
            continue  # read by something not generated
        if len(readers) == 1 and not (r in received and _smaller(space[r][1], space[next(iter(readers))][1])):
            continue  # read by one kernel: cluster.py inlines it where it can
        if any(is_gather_table(u, p) for p in group for u in p.users if u not in inside):
            continue  # read at data-dependent rows: from memory (cluster.py's rule for tables)
        if any(p.target in SCATTER_STORES for p in group):
            continue  # writes at data-dependent positions (a sort's values at their ranks): made once, read back
        for c in readers:
            for copy in _copy_into(graph, group, members, c, order, dag, find):
                adopt(copy, c)
            received.add(c)
            if space[r][0] == "pwi" and space[c][0] == "pw":
                space[c] = ("pwi", space[c][1])  # it now reads through the producer's views
        del members[r], space[r]
        dag.remove_node(r)
        changed = True
    return changed


def _smaller(a: tuple, b: tuple) -> bool:
    """Fewer elements in shape `a` than in `b`, decided on static sizes (symbolic ones: unknown, False)."""
    if not all(isinstance(x, int) for x in a + b):
        return False
    return math.prod(a) < math.prod(b)


def _copy_into(graph: fx.Graph, group: List[fx.Node], members: Dict[fx.Node, List[fx.Node]], reader: fx.Node,
               order: Dict[fx.Node, float], dag: nx.DiGraph, find: Callable[[fx.Node], fx.Node]) -> List[fx.Node]:
    inside = set(group)
    reading = set(members[reader])
    # only what this reader needs: the producer's values it reads and what they are computed from
    need = {p for p in group if any(u in reading for u in p.users)}
    stack = list(need)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in inside and a not in need:
                need.add(a)
                stack.append(a)
    copies: Dict[fx.Node, fx.Node] = {}
    for k, p in enumerate(sorted(need, key=order.get)):
        with graph.inserting_after(p):  # after p's inputs (or their copies, placed right after them)
            copies[p] = graph.node_copy(p, lambda a: copies.get(a, a))
        order[copies[p]] = order[p] + (k + 1) * 1e-6
        for a in p.all_input_nodes:
            if a not in inside:
                dag.add_edge(find(a), reader)
    for p, copy in copies.items():
        for u in list(p.users):
            if u in reading:
                u.replace_input_with(p, copy)
    members[reader] += list(copies.values())
    return list(copies.values())
