"""Lowering a cluster that indexes: every value evaluated at the coordinates its consumer reads.

Element-wise clusters evaluate each node once, at the kernel's point.  A cluster with views of
computed values, `cat`, gathers or `arange` (isel_index.py) cannot: `cat(-x2, x1)` reads `x` at
two other points.  Here a value is asked for at a map (its own coordinates as index expressions
of the kernel's coordinates) under a guard (the conditions a `cat` branch holds under), and built
on demand, once per (node, map, guard):
- an element-wise node evaluates its operands at the same map (broadcast dims read coordinate 0),
  then its rule from the lowering table;
- an index node turns the map into its source's map (and a select between branches, or a gather);
- a tensor the kernel only reads is a plain load when the map is the kernel's own point (read
  through its strides, as in every kernel), else a `load.at` at the map's expressions.
Outputs are stored at the kernel's point, so a value something outside reads must have the
kernel's shape (or, in a row kernel, the per-row shape); the cluster step only re-indexes
producers nothing else reads.

In a row kernel a reduction is asked for at a map of its result; it is the kernel's own row when
that map's kept coordinates do not move along the kernel's row (no `c{reduce_dim}`, no gathered
value): its input is then evaluated at that map with the reduced coordinate walking the kernel's
row, once per distinct row map.  A scan (cumsum) gives one value per element: it is only asked
for at the kernel's own position along the row.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx

from .index_expr import Affine, identity
from .cluster_isel import ClusterSpec, output_orders, reduction_value
from .isel_reduce import is_reduction, is_result_of_reduction, row_space
from .isel import Builder, Policy, Refused, Value, lower_node, packet, scalar_operand
from .isel_index import (GATHER_OPS, SCATTERS, SLICE_WRITES, TRIANGLES, VIEW_OPS, Map, arange_value,
                         cat_branches, conv_taps, gather_parts, is_index_op, is_scatter_store, padded_source,
                         repeat_source, scatter_rows, sizes, view_source, wraps_negative_ids, written_slice)
from .kir import KernelIR, opmath

aten = torch.ops.aten
Guard = Tuple[Tuple[Affine, int, Optional[int]], ...]  # lo <= expr < hi (hi None: no upper end)


def lower_indexed_cluster(spec: ClusterSpec, b: Builder, policy: Policy) -> KernelIR:
    ev = _Evaluator(spec, b, policy)
    per_row = []
    for k, node in enumerate(spec.outputs):
        shape = sizes(node.meta["val"])
        if spec.per_row(node):  # one value per row of a row kernel: stored at the row
            b.store(k, ev.at(node, ev.row_map(shape, node), ()), node.meta["val"].dtype)
            per_row.append(k)
            continue
        if shape != ev.space:
            raise Refused(f"{node.name} is read outside the kernel but has shape {list(shape)}, not the "
                          f"kernel's {list(ev.space)}")
        if is_scatter_store(node):  # out[ids] = values: each value written at its id along dim 0
            dtype, values, ids = node.meta["val"].dtype, node.args[2], node.args[1][0]
            value = b.cast(ev.at(values, ev.natural(sizes(values.meta["val"])), ()), dtype)
            at = b.cast(ev.at(ids, (Affine.coord(0),), ()), torch.int64)
            b.emit("store.at", dtype, (value, at), k, "mem")
            continue
        b.store(k, ev.at(node, ev.natural(shape), ()), node.meta["val"].dtype)
    origin = ", ".join(str(packet(n) or getattr(n.target, "__name__", n.target)).replace("aten.", "")
                       for n in spec.nodes)
    orders = output_orders(spec)
    if orders and any(list(orders[k]) != list(range(spec.rank)) for k in per_row):
        raise Refused("a row kernel writes its per-row values contiguous; one leaves in a permuted layout")
    return KernelIR(spec.rank, tuple(n.meta["val"].dtype for n in spec.inputs),
                    tuple(n.meta["val"].dtype for n in spec.outputs), tuple(b.instrs), origin,
                    spec.reduce_dim, tuple(per_row), output_orders=orders)


class _Evaluator:
    def __init__(self, spec: ClusterSpec, b: Builder, policy: Policy):
        self.b, self.policy, self.reduce_dim = b, policy, spec.reduce_dim
        self.space = (tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in spec.space)
                      if spec.reduce_dim is not None else sizes(spec.outputs[0].meta["val"]))
        self.sizes = [s if isinstance(s, int) else None for s in self.space]
        self.inside = set(spec.nodes)
        self.outputs = set(spec.outputs)
        self.input_index = {n: k for k, n in enumerate(spec.inputs)}
        self.memo: Dict[tuple, Any] = {}

    def natural(self, shape: Tuple) -> Map:
        """The map of a value of `shape` broadcast to the kernel's point (right-aligned; size-1 dims read 0)."""
        lead = len(self.space) - len(shape)
        return tuple(Affine.constant(0) if s == 1 else Affine.coord(lead + j) for j, s in enumerate(shape))

    def row_map(self, shape: Tuple, node: fx.Node) -> Map:
        """The map of a per-row value of a row kernel at the kernel's row: the reduced dim kept as 1, or dropped."""
        if len(shape) == len(self.space):
            return self.natural(shape)
        if len(shape) != len(self.space) - 1:
            raise Refused(f"{node.name}: per-row value of shape {list(shape)} in a kernel over {list(self.space)}")
        kept = [d for d in range(len(self.space)) if d != self.reduce_dim]
        return tuple(Affine.constant(0) if s == 1 else Affine.coord(d) for d, s in zip(kept, shape))

    def at(self, node: fx.Node, m: Map, guard: Guard) -> Value:
        if node not in self.inside:
            return self._load(node, m, guard)
        if is_reduction(node) or is_result_of_reduction(node):
            return self._reduction(node, m)
        key = (node, m, guard)
        if key not in self.memo:
            self.memo[key] = self._index(node, m, guard) if is_index_op(node) else self._elementwise(node, m, guard)
        return self.memo[key]

    # ---- element-wise ------------------------------------------------------------------------
    def _elementwise(self, node: fx.Node, m: Map, guard: Guard) -> Value:
        shape = sizes(node.meta["val"])

        def value_of(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return self.at(a, _operand_map(m, shape, sizes(a.meta["val"])), guard)
            return scalar_operand(a)
        return lower_node(self.b, node, value_of, self.policy, node in self.outputs)

    # ---- reductions (row kernels) --------------------------------------------------------------
    def _reduction(self, node: fx.Node, m: Map) -> Value:
        red = node.args[0] if is_result_of_reduction(node) else node
        shape, dim = row_space(red)
        shape = tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in shape)
        rd = self.reduce_dim
        if rd is None or shape[dim] != self.space[rd]:
            raise Refused(f"{red.name}: reduces rows of {shape[dim]}, not the kernel's rows")
        out = sizes(node.meta["val"])
        scan = len(out) == len(shape) and out[dim] == shape[dim] and shape[dim] != 1
        if scan and not m[dim].is_coord(rd):
            raise Refused(f"{red.name}: a scan read at another position along the row")
        if len(out) == len(shape):
            row = m[:dim] + (Affine.coord(rd),) + m[dim + 1:]
        elif len(out) == len(shape) - 1:
            row = m[:dim] + (Affine.coord(rd),) + m[dim:]
        else:
            raise Refused(f"{red.name}: result of shape {list(out)} from rows of {list(shape)}")
        kept = [e for j, e in enumerate(row) if j != dim]
        if any(e.values() or _reads_coord(e, rd) for e in kept):
            raise Refused(f"{red.name}: read at rows that move along the kernel's row")
        if red.target is aten.histc.default and row != identity(len(self.space)):
            raise Refused(f"{red.name}: a histogram's bins are the kernel's own rows")
        key = (red, row, "reduction")
        if key not in self.memo:
            def value_of(a: Any) -> Any:
                if isinstance(a, fx.Node):
                    return self.at(a, _operand_map(row, shape, sizes(a.meta["val"])), ())
                return scalar_operand(a)
            self.memo[key] = reduction_value(self.b, red, value_of, shape[dim])
        v = self.memo[key]
        return v[node.args[1]] if is_result_of_reduction(node) else v

    # ---- index nodes -------------------------------------------------------------------------
    def _index(self, node: fx.Node, m: Map, guard: Guard) -> Value:
        out = node.meta["val"].dtype
        if is_scatter_store(node):
            raise Refused(f"{node.name} (a scatter) is read inside the kernel that writes it")
        if node.target in VIEW_OPS:
            return self.at(node.args[0], view_source(node, m, self.sizes), guard)
        if node.target in (aten.cat.default, aten.stack.default):
            result: Optional[Value] = None
            for src, src_map, (e, lo, hi) in cat_branches(node, m):
                v = self.b.cast(self.at(src, src_map, guard + ((e, lo, hi),)), out)
                if result is None:
                    result = v
                else:
                    start = self.b.vec("ge", self._iota(e), self.b.const(lo, torch.int64))
                    result = self.b.select(start, v, result)
            return result
        if node.target in GATHER_OPS:
            return self._gather(node, m, guard, out)
        if node.target in SLICE_WRITES:  # src where the point lies in the written slice, else base
            base, src, src_map, (e, lo, hi) = written_slice(node, m)
            v = self.b.cast(self.at(src, src_map, guard + ((e, lo, hi),)), out)
            return self.b.select(self._in_range(e, lo, hi), v, self.b.cast(self.at(base, m, guard), out))
        if node.target in TRIANGLES:  # tril keeps col - row <= k, triu col - row >= k; zero elsewhere
            k = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
            keep = self.b.vec("le" if node.target is aten.tril.default else "ge", self._iota(m[-1] - m[-2]),
                              self.b.const(k, torch.int64))
            return self.b.select(keep, self.b.cast(self.at(node.args[0], m, guard), out), self.b.const(0, out))
        if node.target in SCATTERS:  # where an id of the row names this position: the value, or src at the id
            base, ids, dim, rows = scatter_rows(node, m)
            position = self._iota(m[dim])
            # ids read from memory are range-checked on the host against the kernel dim the positions run along
            size = sizes(node.meta["val"])[dim]
            kdim = next((d for d in range(len(self.space)) if m[dim].is_coord(d) and self.space[d] == size),
                        {"size": size} if isinstance(size, int) else None)
            if kdim is None and ids not in self.inside:
                raise Refused(f"{node.name}: its positions do not run along one dim of the kernel and its size is "
                              "symbolic (no host check)")
            result = self.b.cast(self.at(base, m, guard), out)
            for ids_map in rows:  # in the row's order: a later id writes over an earlier one
                picked = self.b.cast(self._ids(ids, ids_map, guard, kdim), torch.int64)
                same = self.b.vec("eq", picked, position)
                value = self.b.const(node.args[3], out) if node.target is aten.scatter.value \
                    else self.b.cast(self.at(node.args[3], ids_map, guard), out)
                result = self.b.select(same, value, result)
            return result
        if node.target is aten.constant_pad_nd.default:  # x inside its borders, the pad value outside
            src_map, borders = padded_source(node, m)
            v = self.b.cast(self.at(node.args[0], src_map, guard + borders), out)
            fill = self.b.const(node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0), out)
            for e, lo, hi in borders:
                v = self.b.select(self._in_range(e, lo, hi), v, fill)
            return v
        if node.target is aten.convolution.default:  # depthwise conv1d: taps summed in order, in opmath
            return self._conv(node, m, guard, out)
        if node.target is aten.repeat.default:
            return self.at(node.args[0], repeat_source(node, m, self.sizes), guard)
        # arange
        return self.b.cast(self._iota(arange_value(node, m)), out)

    def _conv(self, node: fx.Node, m: Map, guard: Guard, out: torch.dtype) -> Value:
        acc_dtype = opmath(out)
        acc = None
        for x_map, w_map, pos, length in conv_taps(node, m):
            x = self.b.cast(self.at(node.args[0], x_map, guard + ((pos, 0, length),)), acc_dtype)
            term = self.b.vec("mul", self.b.select(self._in_range(pos, 0, length), x, self.b.const(0.0, acc_dtype)),
                              self.b.cast(self.at(node.args[1], w_map, guard), acc_dtype))
            acc = term if acc is None else self.b.vec("add", acc, term)
        if node.args[2] is not None:
            acc = self.b.vec("add", acc, self.b.cast(self.at(node.args[2], (m[1],), guard), acc_dtype))
        return self.b.cast(acc, out)

    def _gather(self, node: fx.Node, m: Map, guard: Guard, out: torch.dtype) -> Value:
        table, picks, table_map = gather_parts(node, m)
        wrap = wraps_negative_ids(node)
        table_map, picked = list(table_map), []
        for ids, ids_map, dim in picks:
            p = self.b.cast(self.at(ids, ids_map, guard), torch.int64)
            e = self._coordinates_within(p, table, dim)
            if e is not None:  # ids from arange: an index expression (a strided read, no range check)
                table_map[dim] = e
                continue
            picked.append((p, dim))
            table_map[dim] = Affine.value(p.id)
        if table not in self.inside:  # the load wraps negative ids (by the table's size at run time)
            wrapped = [dim for _, dim in picked] if wrap else []
            return self.b.cast(self._load(table, tuple(table_map), guard, wrap=wrapped), out)
        if not picked:
            return self.b.cast(self.at(table, tuple(table_map), guard), out)
        # a table the kernel computes: evaluated at the gathered rows, NaN for an id outside it
        inside, extra = None, ()
        for p, dim in picked:
            size = sizes(table.meta["val"])[dim]
            if not isinstance(size, int):
                raise Refused(f"{node.name} gathers from a computed value of symbolic size {size}")
            if wrap:
                negative = self.b.vec("lt", p, self.b.const(0, torch.int64))
                p = self.b.select(negative, self.b.vec("add", p, self.b.const(size, torch.int64)), p)
                table_map[dim] = Affine.value(p.id)
            ok = self.b.vec("and", self.b.vec("ge", p, self.b.const(0, torch.int64)),
                            self.b.vec("lt", p, self.b.const(size, torch.int64)))
            inside = ok if inside is None else self.b.vec("and", inside, ok)
            extra += ((table_map[dim], 0, size),)
        v = self.b.cast(self.at(table, tuple(table_map), guard + extra), out)
        return self.b.select(inside, v, self.b.const(float("nan") if out.is_floating_point else 0, out))

    def _coordinates_within(self, ids: Value, table: fx.Node, dim: int) -> Optional[Affine]:
        """The ids as an index expression when they are coordinates (an `iota`: `arange` picks, transformers'
        `pm[batch, kv]`) that provably stay inside the table's dim; else None (read as values, range-checked)."""
        ins = self.b.instrs[ids.id]
        if ins.op != "iota":
            return None
        e = Affine.from_json(json.loads(ins.attr))
        size = sizes(table.meta["val"])[dim]
        lo, hi = e.range(self.sizes)
        if isinstance(size, int) and lo is not None and hi is not None and 0 <= lo and hi < size:
            return e
        coord = next((d for d in range(len(self.space)) if e.is_coord(d)), None)
        return e if coord is not None and self.space[coord] == size else None

    def _ids(self, ids: fx.Node, m: Map, guard: Guard, bound_dim) -> Value:
        """Ids a scatter writes through: read in memory they are range-checked on the host against the kernel's
        dim `bound_dim`, or below {"size": n} (eager raises for an id outside the result)."""
        if ids in self.inside:
            return self.at(ids, m, guard)
        return self._load(ids, m, guard, ids_of=bound_dim)

    def _in_range(self, e: Affine, lo: int, hi: Optional[int]) -> Value:
        """lo <= e (< hi): the condition a guard states, as a value (selects take the guarded branch's result)."""
        inside = self.b.vec("ge", self._iota(e), self.b.const(lo, torch.int64))
        if hi is None:
            return inside
        return self.b.vec("and", inside, self.b.vec("lt", self._iota(e), self.b.const(hi, torch.int64)))

    def _iota(self, e: Affine) -> Value:
        return self.b.emit("iota", torch.int64, self._operands(e), json.dumps(e.to_json()))

    # ---- memory --------------------------------------------------------------------------------
    def _load(self, node: fx.Node, m: Map, guard: Guard, ids_of=None, wrap=()) -> Value:
        if node not in self.input_index:
            raise Refused(f"operand {node.name} is neither in the kernel nor an input")
        k, val = self.input_index[node], node.meta["val"]
        shape = sizes(val)
        if m == self.natural(shape) and not guard and self._broadcasts(shape) and ids_of is None and not wrap:
            return self.b.load(k, val.dtype)
        exprs = list(m) + [e for e, _, _ in guard]
        attr = {"in": k, "index": [e.to_json() for e in m], "guard": [[e.to_json(), lo, hi] for e, lo, hi in guard],
                "bounds": [j for j, e in enumerate(m) if e.values()]}
        if ids_of is not None:
            attr["ids_of"] = ids_of  # positions along this kernel dim, or below {"size": n} (a host check)
        if wrap:
            attr["wrap"] = list(wrap)  # a negative value at these dims counts from the end (x[ids])
        operands = tuple(sorted({v for e in exprs for v in e.values()}))
        return self.b.emit("load.at", val.dtype, tuple(Value(v, self.b.instrs[v].dtype) for v in operands),
                           json.dumps(attr, sort_keys=True), "mem")

    def _broadcasts(self, shape: Tuple) -> bool:
        """A plain load reads the input broadcast to the kernel's point: only an input of such a shape."""
        lead = len(self.space) - len(shape)
        return lead >= 0 and all(s == 1 or s == self.space[lead + j] for j, s in enumerate(shape))

    def _operands(self, e: Affine) -> Tuple[Value, ...]:
        return tuple(Value(v, self.b.instrs[v].dtype) for v in sorted(set(e.values())))


def _reads_coord(e: Affine, d: int) -> bool:
    return any(a.kind == "c" and a.n == d or a.inner is not None and _reads_coord(a.inner, d) for a, _ in e.terms)


def _operand_map(m: Map, shape: Tuple, operand: Tuple) -> Map:
    """An operand's coordinates at the point `m` of a broadcasting op's result."""
    lead = len(shape) - len(operand)
    return tuple(Affine.constant(0) if s == 1 else m[lead + j] for j, s in enumerate(operand))
