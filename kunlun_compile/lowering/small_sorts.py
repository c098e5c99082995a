"""Short 1-d sorts as ranks, so that the generated kernels hold them instead of ATen's sort launches.

An element's place in the sorted order is the number of elements that come before it:

    rank[i] = #{j : x[j] before x[i]},   x[j] before x[i]  <=>  x[j] < x[i], or x[j] == x[i] and j < i

(`>` when descending; NaN sorts as the largest value, as torch's sort puts it; equal values keep their
order, so the result is `sort(stable=True)`'s, which is also a valid result of a sort that does not promise
stability).  Written as ATen ops -- a comparison over [n, n] summed along a row, then the values and their
positions written at their ranks into fresh tensors -- the generic lowering makes it two kernels: a row
kernel of n rows of n, and one scatter store.  transformers' MoE dispatch sorts tokens x top-k expert ids:
at decode that is 8 to 512 elements, where ATen's sort costs several launches.  The comparison is n^2
work, so only static lengths up to MAX_RANKED are rewritten; longer or symbolic ones stay ATen's sort.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph_emit import emit

aten = torch.ops.aten
MAX_RANKED = 1024
SORTS = {aten.sort.default, aten.sort.stable}


def sorts_as_ranks(graph: fx.Graph) -> int:
    """Rewrite every short static 1-d sort whose results are read by position; returns how many."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SORTS:
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not _rankable(node, val):
            continue
        with graph.inserting_before(node):
            values, positions, rank = _ranked(graph, x, val, _descending(node))
        _inverses_as_ranks(graph, node, rank)
        for item in list(node.users):
            item.replace_all_uses_with(values if item.args[1] == 0 else positions)
            graph.erase_node(item)
        graph.erase_node(node)
        done += 1
    return done


def _inverses_as_ranks(graph: fx.Graph, sort: fx.Node, rank: fx.Node) -> None:
    """The inverse of the sorting permutation, `inv[perm] = arange(n)` into a fresh tensor (transformers'
    MoE dispatch), is the rank: perm[rank[i]] = i."""
    n = rank.meta["val"].shape[0]
    for item in [u for u in sort.users if u.args[1] == 1]:
        for write in list(item.users):
            # (in place, `index_put_`, when nothing else holds the fresh tensor: graphs traced unfunctionalised)
            if (write.target in (aten.index_put.default, aten.index_put_.default) and write.args[1] == [item]
                    and not _accumulates(write) and _is_fresh(write.args[0]) and _is_arange(write.args[2], n)
                    and write.meta["val"].dtype == torch.int64
                    and tuple(write.meta["val"].shape) == (n,)
                    and (write.target is aten.index_put.default or len(write.args[0].users) == 1)):
                write.replace_all_uses_with(rank)
                graph.erase_node(write)


def _accumulates(write: fx.Node) -> bool:
    return bool(write.args[3] if len(write.args) > 3 else write.kwargs.get("accumulate", False))


def _is_fresh(node) -> bool:
    return isinstance(node, fx.Node) and node.target in (aten.empty_like.default, aten.empty.memory_format)


def _is_arange(node, n: int) -> bool:
    """`node` is arange(n) of int64 (0, 1, .., n-1)."""
    if not isinstance(node, fx.Node) or node.meta["val"].dtype != torch.int64:
        return False
    if node.target is aten.arange.default:
        return node.args[0] == n
    return node.target is aten.arange.start and node.args[:2] == (0, n)


def _rankable(node: fx.Node, val) -> bool:
    if not isinstance(val, torch.Tensor) or val.dim() != 1 or not isinstance(val.shape[0], int):
        return False
    if not 2 <= val.shape[0] <= MAX_RANKED or val.dtype == torch.bool or val.is_complex():
        return False
    dim = node.kwargs.get("dim", node.args[1] if node.target is aten.sort.default and len(node.args) > 1 else -1)
    return dim in (0, -1) and all(u.target is operator.getitem and u.args[1] in (0, 1) for u in node.users)


def _descending(node: fx.Node) -> bool:
    if node.target is aten.sort.default:
        return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("descending", False))
    return bool(node.kwargs.get("descending", False))


def _ranked(graph: fx.Graph, x: fx.Node, val: torch.Tensor, descending: bool):
    """(values, positions, ranks) of x sorted, built from ranks."""
    n = val.shape[0]

    def e(target, *args, **kwargs):
        return emit(graph, target, args, kwargs, like=x)

    mine, other = e(aten.unsqueeze.default, x, 1), e(aten.unsqueeze.default, x, 0)  # x[i] per row, x[j] along it
    ids = e(aten.arange.default, n, dtype=torch.int64, device=val.device)
    earlier = e(aten.lt.Tensor, e(aten.unsqueeze.default, ids, 0), e(aten.unsqueeze.default, ids, 1))
    first = e(aten.gt.Tensor if descending else aten.lt.Tensor, other, mine)
    same = e(aten.eq.Tensor, other, mine)
    if val.dtype.is_floating_point:  # NaN: the largest value, equal to another NaN
        nan_mine, nan_other = e(aten.ne.Tensor, mine, mine), e(aten.ne.Tensor, other, other)
        nan_first = (nan_other, nan_mine) if descending else (nan_mine, nan_other)
        first = e(aten.bitwise_or.Tensor, first,
                  e(aten.bitwise_and.Tensor, nan_first[0], e(aten.bitwise_not.default, nan_first[1])))
        same = e(aten.bitwise_or.Tensor, same, e(aten.bitwise_and.Tensor, nan_mine, nan_other))
    before = e(aten.bitwise_or.Tensor, first, e(aten.bitwise_and.Tensor, same, earlier))
    rank = e(aten.sum.dim_IntList, before, [1])
    values = e(aten.index_put.default, e(aten.empty_like.default, x), [rank], x)
    fresh = e(aten.empty.memory_format, [n], dtype=torch.int64, device=val.device)
    positions = e(aten.index_put.default, fresh, [rank], ids)
    return values, positions, rank
