"""Instruction selection for a whole cluster: its nodes, in graph order, to one KernelIR.

isel.py selects instructions for one ATen node (the lowering table, the accuracy policy); this module
walks a cluster (cluster.py's ClusterSpec): loads of its inputs, one node after another, reductions
(isel_reduce.py) in row kernels, and the stores of the values something outside reads.  A cluster that
indexes (views of computed values, cat, gathers) is evaluated on demand at maps instead (reindex.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx

from .isel import Builder, Policy, Refused, Value, layout_order, lower_node, packet, scalar_operand
from .isel_index import is_index_op
from .isel_reduce import MULTI_OUTPUT, REDUCTIONS, is_reduction, is_result_of_reduction, output_dtypes, row_space
from .kir import KernelIR
from .targets import Target


@dataclasses.dataclass
class ClusterSpec:
    nodes: List[fx.Node]  # in graph order
    inputs: List[fx.Node]  # external tensors read, in the kernel's input order
    outputs: List[fx.Node]  # nodes whose values leave the kernel
    rank: int
    # row kernels: the reduced dim and the iteration space (the reduction's input shape, SymInts kept)
    reduce_dim: Optional[int] = None
    space: Optional[tuple] = None

    def per_row(self, node: fx.Node) -> bool:
        """A value with one element per row (its shape is not the iteration space)."""
        return self.reduce_dim is not None and tuple(node.meta["val"].shape) != tuple(self.space)


def lower_cluster(spec: ClusterSpec, target: Target, policy: Policy) -> KernelIR:
    if any(is_index_op(n) for n in spec.nodes):
        from .reindex import lower_indexed_cluster  # reindex builds on this module (a cycle at import)

        return lower_indexed_cluster(spec, Builder(target, policy), policy)
    b = Builder(target, policy)
    values: Dict[fx.Node, Value] = {}
    input_index = {n: k for k, n in enumerate(spec.inputs)}
    outputs = set(spec.outputs)

    def value_of(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in values:
                return values[a]
            if a in input_index:
                v = b.load(input_index[a], a.meta["val"].dtype)
                return v
            raise Refused(f"operand {a.name} is neither in the kernel nor an input")
        return scalar_operand(a)

    per_row: set = set()  # values computed from a reduction
    for node in spec.nodes:
        if is_result_of_reduction(node):
            values[node] = values[node.args[0]][node.args[1]]
            per_row.add(node)
            continue
        if is_reduction(node):
            values[node] = _lower_reduction(b, spec, node, value_of)
            per_row.add(node)
            continue
        _check_no_dropped_operand(spec, node, per_row)
        values[node] = lower_node(b, node, value_of, policy, node in outputs)

    for k, node in enumerate(spec.outputs):
        if isinstance(values[node], tuple):
            raise Refused(f"{node.name}: a reduction with several results is read outside its kernel")
        b.store(k, values[node], node.meta["val"].dtype)
    origin = ", ".join(str(packet(n) or n.target.__name__).replace("aten.", "") for n in spec.nodes)
    per_row = tuple(k for k, n in enumerate(spec.outputs) if spec.per_row(n))
    orders = output_orders(spec)
    if orders and any(list(orders[k]) != list(range(spec.rank)) for k in per_row):
        raise Refused("a row kernel writes its per-row values contiguous; one leaves in a permuted layout")
    return KernelIR(spec.rank, tuple(n.meta["val"].dtype for n in spec.inputs),
                    tuple(n.meta["val"].dtype for n in spec.outputs), tuple(b.instrs), origin,
                    spec.reduce_dim, per_row, orders)


def output_orders(spec: ClusterSpec) -> Tuple[Tuple[int, ...], ...]:
    """Each output's layout when one of them is not contiguous (KernelIR.output_orders), else ()."""
    # a view read outside the kernel (not dense, or a layout not worth keeping) is written contiguous
    orders = tuple(layout_order(n.meta["val"]) or tuple(range(n.meta["val"].dim())) for n in spec.outputs)
    return orders if any(o != tuple(range(len(o))) for o in orders) else ()


def _lower_reduction(b: Builder, spec: ClusterSpec, node: fx.Node, value_of: Callable) -> Any:
    space, dim = row_space(node)
    if spec.reduce_dim is None or dim != spec.reduce_dim or tuple(space) != tuple(spec.space):
        raise Refused(f"{node.name}: reduces another dim or shape than its row kernel")
    return reduction_value(b, node, value_of, space[dim])


def reduction_value(b: Builder, node: fx.Node, value_of: Callable, length) -> Any:
    """The reduction's result (a tuple for several), its operands given by `value_of`, over rows of `length`."""
    args = [value_of(a) if not isinstance(a, (list, tuple)) else a for a in node.args]
    kwargs = {k: value_of(v) for k, v in node.kwargs.items()}
    dtypes = output_dtypes(node)
    b.result_dtype = dtypes[0]
    if node.target in MULTI_OUTPUT:
        results = MULTI_OUTPUT[node.target](b, args, kwargs, dtypes, length)
        return tuple(b.cast(v, dt) for v, dt in zip(results, dtypes))
    return b.cast(REDUCTIONS[node.target](b, args, kwargs, dtypes[0], length), dtypes[0])


def _check_no_dropped_operand(spec: ClusterSpec, node: fx.Node, per_row: set) -> None:
    """A per-row value whose reduced dim was dropped ([T] of [T, H]) broadcasts against [T, H] along the
    wrong dim in torch's rules: it may only leave the kernel, never feed an element-wise op of another shape.
    `per_row`: the cluster's values computed from a reduction so far (this node is added if it is one)."""
    if spec.reduce_dim is None:
        return
    shape = tuple(node.meta["val"].shape)
    inside = [a for a in node.all_input_nodes if a in per_row]
    for a in inside:
        if len(a.meta["val"].shape) < spec.rank and tuple(a.meta["val"].shape) != shape:
            raise Refused(f"{node.name} uses {a.name}, a per-row value without its reduced dim")
    if inside:
        per_row.add(node)
