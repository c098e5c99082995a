"""The generic lowering pass: clusters (element-wise, or a reduction with its element-wise producers and
consumers) -> KIR -> one `kunlun::pointwise` call each.

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
from ..lowering.cluster_isel import lower_cluster
from ..lowering.complex_pairs import complex_as_pairs
from ..lowering.cumulative_counts import cumulative_counts
from ..lowering.isel import Policy, Refused, is_contiguous, layout_order
from ..lowering.isel_index import SLICE_WRITES, VIEW_OPS, sizes
from ..lowering.small_sorts import sorts_as_ranks
from ..lowering.targets import get_target
from ..lowering.unit_reductions import unit_reductions_as_conversions
from .manager import PassContext, PassOutcome
from .rewrites import mark_replacement, rewrite_allowed

POINTWISE_OP = torch.ops.kunlun.pointwise.default


def lower_elementwise(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    target = get_target(ctx.config.target)
    policy = Policy(fast_math=ctx.config.fast_math)
    _pieces_as_slices(gm.graph)
    _copies_as_conversions(gm.graph)
    unit_reductions_as_conversions(gm.graph)
    sorts_as_ranks(gm.graph)
    cumulative_counts(gm.graph)
    complex_as_pairs(gm.graph)
    tried: Dict[int, Any] = {}  # id(spec) -> (spec, its KIR) from find_clusters' trial: not lowered twice
    clusters, refused = find_clusters(gm, lowers=lambda spec: _trial(spec, target, policy, tried))
    outcome = PassOutcome(near_misses=[f"left as ATen: {r}" for r in refused])
    replaced = {}  # an earlier cluster's output node -> the getitem that now stands for it
    for spec in clusters:
        # (an input replaced by an earlier kernel's result keeps its dtype and shape: the KIR does not change)
        spec.inputs = [replaced.get(x, x) for x in spec.inputs]
        try:
            done = tried.get(id(spec))  # (the spec is kept in the entry: its id is not reused)
            kir = done[1] if done is not None and done[0] is spec else lower_cluster(spec, target, policy)
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


def _trial(spec: ClusterSpec, target, policy: Policy, tried: Dict[int, Any]) -> bool:
    """Lower `spec` once as a trial (find_clusters asks for row kernels that index); keep the KIR for the pass."""
    try:
        tried[id(spec)] = (spec, lower_cluster(spec, target, policy))
    except Refused:
        return False
    return True


_SPLITS = {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.unbind.int}


def _pieces_as_slices(graph: fx.Graph) -> None:
    """The pieces of split / chunk / unbind are views read through getitem; as `slice` / `select` nodes
    each piece is a view the lowering can read in place (a kernel evaluates the source at the piece's
    coordinates).  Views either way: nothing is computed or copied by this."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SPLITS or not node.users:
            continue
        if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
            continue
        src = node.args[0]
        rank = src.meta["val"].dim()
        if node.target is aten.unbind.int:
            dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
            pieces = {i: (aten.select.int, (src, dim, i)) for i in range(src.meta["val"].shape[dim])}
        else:
            dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % rank
            total = src.meta["val"].shape[dim]
            size = node.args[1]
            static = isinstance(size, int) and size > 0 or (isinstance(size, (list, tuple))
                                                              and all(isinstance(x, int) for x in size))
            if not isinstance(total, int) or not static:
                continue
            sizes = list(size) if not isinstance(size, int) else [min(size, total - s) for s in range(0, total, size)]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            pieces = {i: (aten.slice.Tensor, (src, dim, starts[i], starts[i] + sizes[i])) for i in range(len(sizes))}
        if any(u.args[1] not in pieces for u in node.users):
            continue
        for item in list(node.users):
            target, args = pieces[item.args[1]]
            with graph.inserting_before(item):
                view = graph.call_function(target, args)
            view.meta["val"] = item.meta["val"]
            item.replace_all_uses_with(view)
            graph.erase_node(item)
        graph.erase_node(node)


def _copies_as_conversions(graph: fx.Graph) -> None:
    """`copy(dst, src)` is src broadcast to dst's shape, in dst's dtype and layout: dst's values are not read.
    Written into a slice (functionalised `x[..., a:b] = y`: copy, then slice_scatter) it becomes expand +
    convert nodes, so the lowering evaluates src in place and the buffer needs no read.  A whole-tensor copy
    (`zeros(..).copy_(x)`, a cache state) into a contiguous dst becomes a `_to_copy` of src, contiguous, in dst's
    dtype.  Shapes and layouts are compared as expressions: nothing is guarded on."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.copy.default or not node.users:
            continue
        dst, src = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
        if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor):
            continue
        if all(u.target in SLICE_WRITES and u.args[1] is node and u.args[0] is not node for u in node.users):
            value = _broadcast_convert(graph, node, dst, src)
            if value is None:
                continue
        elif sizes(src) == sizes(dst) and is_contiguous(dst):
            with graph.inserting_before(node):
                value = graph.call_function(torch.ops.aten._to_copy.default, (node.args[1],),
                                            dict(dtype=dst.dtype, memory_format=torch.contiguous_format))
            value.meta["val"] = src.to(dst.dtype, copy=True, memory_format=torch.contiguous_format)
        else:
            continue
        dst_node = node.args[0]
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        while dst_node.op == "call_function" and not dst_node.users and dst_node.target in VIEW_OPS:
            view, dst_node = dst_node, dst_node.args[0]  # the view the copy wrote through: now unread
            graph.erase_node(view)


def _broadcast_convert(graph: fx.Graph, node: fx.Node, dst: torch.Tensor, src: torch.Tensor) -> Optional[fx.Node]:
    """src expanded to dst's shape and converted to its dtype; None where the expand would need a symbolic size
    (a SymInt in a node's arguments names a symbol the graph may not bind: kept as the copy it was)."""
    value = node.args[1]
    src_sizes, dst_sizes = sizes(src), sizes(dst)
    lead = len(dst_sizes) - len(src_sizes)
    # -1 keeps a dim that src already has; a broadcast dim needs its (static) size
    target = [-1 if d >= lead and src_sizes[d - lead] == size else size for d, size in enumerate(dst_sizes)]
    if lead < 0 or not all(isinstance(t, int) for t in target):
        return None
    with graph.inserting_before(node):
        if any(t != -1 for t in target):
            value = graph.call_function(torch.ops.aten.expand.default, (value, target))
            value.meta["val"] = src.expand(dst.shape)
        if src.dtype != dst.dtype:
            before = value.meta["val"]
            value = graph.call_function(torch.ops.prims.convert_element_type.default, (value, dst.dtype))
            value.meta["val"] = before.to(dst.dtype)
    return value


def _shape_args(graph: fx.Graph, spec: ClusterSpec) -> List[Any]:
    """The iteration shape as ints and `sym_size` nodes of an input (inserted after that input)."""
    shape = spec.space if spec.reduce_dim is not None else spec.outputs[0].meta["val"].shape
    out: List[Any] = []
    for d, size in enumerate(shape):
        if not isinstance(size, torch.SymInt):
            out.append(int(size))
            continue
        src = _input_dim_with(spec, size.node.expr, len(shape) - d)
        if src is None:  # a cat's length: build it from the sizes of inputs (s0 + 1, 2*s0)
            out.append(_size_from_inputs(graph, spec, size))
            continue
        node, dim = src
        with graph.inserting_after(node):
            sym = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
        sym.meta["val"] = size
        out.append(sym)
    return out


def _size_from_inputs(graph: fx.Graph, spec: ClusterSpec, size: torch.SymInt) -> fx.Node:
    """A node computing `size` (a sum / product of the inputs' symbolic sizes and integers), placed
    before the cluster's first node."""
    import sympy

    def build(expr):
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            for x in spec.inputs:
                for d, s in enumerate(x.meta["val"].shape):
                    if isinstance(s, torch.SymInt) and s.node.expr == expr:
                        with graph.inserting_before(spec.nodes[0]):
                            node = graph.call_function(torch.ops.aten.sym_size.int, (x, d))
                        node.meta["val"] = s
                        return node
            for n in spec.nodes:  # a size the graph computes as a value (arange's symbolic end)
                for a in n.all_input_nodes:
                    if isinstance(a.meta.get("val"), torch.SymInt) and a.meta["val"].node.expr == expr:
                        return a
            raise Refused(f"no input has the symbolic size {expr}")
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            parts = [build(a) for a in expr.args]
            op = operator.add if isinstance(expr, sympy.Add) else operator.mul
            acc = parts[0]
            for p in parts[1:]:
                value = op(*(x.meta["val"] if isinstance(x, fx.Node) else x for x in (acc, p)))
                with graph.inserting_before(spec.nodes[0]):
                    acc = graph.call_function(op, (acc, p))
                acc.meta["val"] = value
            return acc
        raise Refused(f"symbolic size {expr} is not a sum or product of the inputs' sizes")
    return build(size.node.expr)


def _input_dim_with(spec: ClusterSpec, expr, from_end: int) -> Optional[tuple]:
    for x in spec.inputs:
        val = x.meta["val"]
        d = val.dim() - from_end
        if d >= 0 and isinstance(val.shape[d], torch.SymInt) and val.shape[d].node.expr == expr:
            return x, d
    return None


def _kernel_result(spec: ClusterSpec, node: fx.Node) -> torch.Tensor:
    """What the kernel returns for `node`: its value, or for a per-row value without its reduced dim,
    that value with the dim kept as size 1."""
    val = node.meta["val"]
    if spec.reduce_dim is None:
        return val if layout_order(val) is not None else val.new_empty(val.shape)  # views come back contiguous
    if val.dim() == spec.rank:
        return val
    return val.unsqueeze(spec.reduce_dim)


def _replace(graph: fx.Graph, spec: ClusterSpec, key: str, shape: List[Any]) -> Dict[fx.Node, fx.Node]:
    last = spec.nodes[-1]
    with graph.inserting_after(last):
        call = graph.call_function(POINTWISE_OP, (list(spec.inputs), shape, key))
    call.meta["val"] = [_kernel_result(spec, n) for n in spec.outputs]
    call.meta["kunlun_lowered_from"] = [n.name for n in spec.nodes]
    items = {}
    for k, n in enumerate(spec.outputs):
        with graph.inserting_after(call):
            item = graph.call_function(operator.getitem, (call, k))
        item.meta["val"] = call.meta["val"][k]
        if item.meta["val"].dim() != n.meta["val"].dim():  # a per-row result whose reduced dim was dropped
            with graph.inserting_after(item):
                item = graph.call_function(torch.ops.aten.squeeze.dim, (item, spec.reduce_dim))
            item.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(item)
        mark_replacement(n, item)
        items[n] = item
    for n in reversed(spec.nodes):
        graph.erase_node(n)
    return items
