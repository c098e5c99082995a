"""Indexing inside a generated kernel: views, `cat`, gathers and `arange` as maps between coordinates.

Each rule says, for a point of the node's result (its coordinates `M`, index expressions of the
kernel's coordinates), which point of which source it is:
- views of values the kernel computes (slice, select, transpose / permute, unsqueeze / squeeze,
  expand, view / reshape): the source's coordinates as expressions of `M` — the producer is then
  evaluated at those coordinates instead of being stored and re-read;
- `cat` along a dim: a select between its sources, each read at the shifted coordinate under a
  guard (the loads of a branch never touch memory outside its source);
- gathers (`index_select`, `embedding`, `gather`): the ids are evaluated first and become an atom
  of the source's index expression; an id outside the table reads nothing and gives NaN, as the
  kunlun:: ops do (ops/index_checks.py);
- `arange`: the coordinate itself (an `iota` instruction).
A view of a tensor the kernel only reads (a graph input, a matmul's result) is not lowered: the
kernel reads it through its strides, as before.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .index_expr import Affine

aten = torch.ops.aten

Map = Tuple[Affine, ...]

# views: result coordinates -> source coordinates
VIEW_OPS = {aten.slice.Tensor, aten.select.int, aten.permute.default, aten.transpose.int, aten.t.default,
            aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
            aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default}
GATHER_OPS = {aten.index_select.default, aten.embedding.default, aten.gather.default, aten.index.Tensor}
# out[ids] = values into a fresh tensor (transformers' inverse permutation of its MoE dispatch): a kernel
# over the values that writes each at its id; what it writes is read from memory by other kernels
SCATTER_STORES = {aten.index_put.default, aten.index_put_.default}
FRESH_TENSORS = {aten.empty_like.default, aten.empty.memory_format, aten.new_empty.default}
# a value written over a slice / an index of another (functionalised `x[..., a:b] = y`, MLA's q/k assembly)
SLICE_WRITES = {aten.slice_scatter.default, aten.select_scatter.default}
# element-wise ops that read the point's coordinates: the triangle masks
TRIANGLES = {aten.tril.default, aten.triu.default}
# a row's few ids name the positions that take a value (a constant, or src at the id's own position)
SCATTERS = {aten.scatter.value, aten.scatter.src}
# a depthwise 1-d convolution of a few taps (Qwen3-Next's causal conv over the sequence): a sum of shifted reads
MAX_CONV_TAPS = 8
INDEX_OPS = VIEW_OPS | GATHER_OPS | SCATTER_STORES | SLICE_WRITES | TRIANGLES | SCATTERS | {
    aten.cat.default, aten.stack.default, aten.arange.default, aten.arange.start, aten.arange.start_step,
    aten.repeat.default, aten.constant_pad_nd.default, aten.convolution.default}
# ops that may read one source element for several result elements (recomputing a producer per use)
DUPLICATING = {aten.expand.default, aten.repeat.default, *SCATTERS, *GATHER_OPS}
MAX_SCATTER_IDS = 16  # scatter.value compares each result element with every id of its row: few ids only


class IndexRefused(Exception):
    pass


def is_index_op(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in INDEX_OPS


def is_scatter_store(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SCATTER_STORES


def _why_not_scatter_store(node: fx.Node) -> Optional[str]:
    base, indices, values = node.args[0], node.args[1], node.args[2]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate:
        return "index_put with accumulate (a scatter-add)"
    if not (isinstance(base, fx.Node) and base.op == "call_function" and base.target in FRESH_TENSORS
            and len(base.users) == 1):
        return "index_put into a tensor with values of its own (only a fresh empty one is generated)"
    if len(indices) != 1 or not isinstance(indices[0], fx.Node) or indices[0].meta["val"].dtype == torch.bool \
            or indices[0].meta["val"].dim() != 1:
        return "index_put with other than one 1-d index tensor"
    if not isinstance(values, fx.Node) or _shape(values) != _shape(base) or _shape(indices[0])[0] != _shape(base)[0]:
        return "index_put of values not shaped as its result"
    return None


def is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in VIEW_OPS


def repeat_source(node: fx.Node, m: Map, sizes: Sequence[Optional[int]]) -> Map:
    """x.repeat(reps): the point `m` reads x at each coordinate modulo x's size (new leading dims dropped)."""
    src, reps = _shape(node.args[0]), list(node.args[1])
    lead = len(reps) - len(src)
    return tuple(m[lead + d] if reps[lead + d] == 1 else m[lead + d].mod(src[d], sizes) for d in range(len(src)))


def padded_source(node: fx.Node, m: Map) -> Tuple[Map, Tuple[Tuple[Affine, int, Optional[int]], ...]]:
    """constant_pad_nd: (x's coordinates at `m`, the guards under which `m` lies inside x; pads count from the
    last dim, (before, after) each; a negative pad crops)."""
    pads, src = list(node.args[1]), _shape(node.args[0])
    out, guards = list(m), []
    for k in range(len(pads) // 2):
        d, before, after = len(m) - 1 - k, pads[2 * k], pads[2 * k + 1]
        if before == 0 and after == 0:
            continue
        out[d] = m[d] - before
        lo = before if before > 0 else 0
        hi = before + src[d] if after > 0 else None
        if lo or hi is not None:
            guards.append((m[d], lo, hi))
    return tuple(out), tuple(guards)


def scatter_rows(node: fx.Node, m: Map) -> Tuple[fx.Node, fx.Node, int, List[Map]]:
    """scatter.value / .src: (self, ids, dim, the ids' coordinates for each id of the point's row)."""
    src, dim, index = node.args[0], node.args[1] % len(m), node.args[2]
    k = _shape(index)[dim]
    return src, index, dim, [m[:dim] + (Affine.constant(j),) + m[dim + 1:] for j in range(k)]


def is_gather_table(node: fx.Node, operand: fx.Node) -> bool:
    return node.op == "call_function" and node.target in GATHER_OPS and node.args[0] is operand


def sizes(val: torch.Tensor) -> Tuple:
    """val's sizes as ints and sympy expressions: compared structurally, never guarded on (unbacked sizes of
    data-dependent shapes would raise)."""
    out = []
    for s in val.shape:
        if isinstance(s, torch.SymInt):
            e = s.node.expr
            out.append(int(e) if e.is_Integer else e)
        else:
            out.append(int(s))
    return tuple(out)


def _shape(node: fx.Node) -> Tuple:
    return sizes(node.meta["val"])


def _static(xs: Sequence[Any]) -> bool:
    return all(isinstance(x, int) for x in xs)


def why_not_indexable(node: fx.Node) -> Optional[str]:
    """None if the lowering can express `node` as a coordinate map, else why not."""
    t = node.target
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "no tensor result"
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        src = _shape(node.args[0])
        if not _static(src[1:]) or not _static(_shape(node)[1:]):
            return "a reshape of symbolic sizes beyond the first dim"
    if t in (aten.cat.default, aten.stack.default):
        if not all(isinstance(x, fx.Node) for x in node.args[0]):
            return f"{t.__name__} of non-tensors"
        if t is aten.cat.default:
            dim = _cat_dim(node)
            sources = [x for x in node.args[0] if x.meta["val"].dim() == val.dim()]  # cat skips 1-d empties
            if not _static([_shape(x)[dim] for x in sources[:-1]]):
                return "cat of symbolic sizes along its dim (before its last source)"
    if t is aten.repeat.default:
        src, reps = _shape(node.args[0]), list(node.args[1])
        if not _static(reps) or not _static([x for x, k in zip(src, reps[len(reps) - len(src):]) if k != 1]):
            return "repeat of symbolic sizes"
    if t in SCATTERS:
        src, dim, index = node.args[0], node.args[1] % val.dim(), node.args[2]
        source = node.args[3]
        if t is aten.scatter.src and (not isinstance(source, fx.Node) or source.meta["val"].dim() != val.dim()):
            return "scatter of a src that is not a tensor of the result's rank"
        k = _shape(index)[dim]
        others = [d for d in range(val.dim()) if d != dim]
        if not isinstance(k, int) or k > MAX_SCATTER_IDS:
            return f"scatter of {k} ids per row (more than {MAX_SCATTER_IDS})"
        if index.meta["val"].dim() != val.dim() or any(_shape(index)[d] != _shape(node)[d] for d in others):
            return "scatter whose ids do not cover the result's other dims"
    if t in SCATTER_STORES:
        return _why_not_scatter_store(node)
    if t is aten.index.Tensor:
        indices = node.args[1]
        if not all(isinstance(i, fx.Node) for i in indices):
            return "indexing that skips dims (None between index tensors)"
        if any(i.meta["val"].dtype == torch.bool for i in indices):
            return "indexing with a mask"
    if t is aten.slice.Tensor:
        dim, start, end, step = _slice_args(node)
        if not _static([start, step]):
            return "a slice with a symbolic start"
    if t is aten.slice_scatter.default:
        dim, start, end, step = _slice_args(node, _shape(node))
        if not _static([start]) or step != 1:
            return "a slice write with a symbolic start or a step"
    if t is aten.select_scatter.default and not isinstance(node.args[3], int):
        return "a select write at a symbolic index"
    if t is aten.constant_pad_nd.default:
        pads, src = list(node.args[1]), _shape(node.args[0])
        if not _static(pads):  # transformers pads its masks by a symbolic length under dynamic shapes
            return "a pad of symbolic sizes"
        padded_after = [src[len(src) - 1 - k] for k in range(len(pads) // 2) if pads[2 * k + 1] > 0]
        if not _static(padded_after):
            return "a pad of symbolic sizes"
    if t is aten.convolution.default:
        return _why_not_depthwise_conv1d(node)
    if t in TRIANGLES and val.dim() < 2:
        return f"{t.__name__} of a {val.dim()}-d tensor"
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        start_step = node.args[:1] + node.args[2:] if len(node.args) > 1 else ()
        if not all(isinstance(a, int) for a in start_step):
            return "arange with a non-integer start or step"
    return None


def _why_not_depthwise_conv1d(node: fx.Node) -> Optional[str]:
    x, w = _shape(node.args[0]), _shape(node.args[1])
    stride, padding, dilation, transposed, _, groups = node.args[3:9]
    if len(x) != 3 or len(w) != 3 or transposed:
        return "a convolution other than 1-d (only depthwise 1-d convolutions are generated)"
    if not (groups == x[1] == w[0] and w[1] == 1) or not isinstance(w[2], int) or w[2] > MAX_CONV_TAPS:
        return f"a convolution that is not depthwise with at most {MAX_CONV_TAPS} taps"
    if not _static(list(stride) + list(padding) + list(dilation) + [x[2]]):
        return "a convolution of symbolic sizes"
    return None


def conv_taps(node: fx.Node, m: Map) -> List[Tuple[Map, Map, Affine, int]]:
    """Depthwise conv1d at the point m = (batch, channel, t): for each tap k, (x's coordinates, the weight's
    coordinates, the read position, x's length): out = sum_k x[b, c, t*stride - pad + k*dil] * w[c, 0, k]."""
    x, w = _shape(node.args[0]), _shape(node.args[1])
    (stride,), (pad,), (dil,) = node.args[3], node.args[4], node.args[5]
    taps = []
    for k in range(w[2]):
        pos = m[2] * stride + (k * dil - pad)
        taps.append(((m[0], m[1], pos), (m[1], Affine.constant(0), Affine.constant(k)), pos, x[2]))
    return taps


def _slice_args(node: fx.Node, src: Optional[Tuple] = None):
    """(dim, start, end, step) of a slice (of node.args[0], or of `src`); slice_scatter's come after its src."""
    skip = 1 if node.target is aten.slice_scatter.default else 0
    args = list(node.args[skip:]) + [None] * (5 - len(node.args[skip:]))
    _, dim, start, end, step = args[:5]
    src = _shape(node.args[0]) if src is None else src
    dim = (dim or 0) % len(src)
    start = 0 if start is None else start
    if isinstance(start, int) and start < 0:
        start += src[dim] if isinstance(src[dim], int) else 0
    return dim, start, end, step or 1


# ---- maps: rule(node, M, sizes) -> source coordinates ----------------------------------------------

def view_source(node: fx.Node, m: Map, sizes: Sequence[Optional[int]]) -> Map:
    """The coordinates of node.args[0] that the point `m` of a view's result reads."""
    t, a = node.target, node.args
    src = _shape(a[0])
    rank = len(src)
    if t is aten.alias.default:
        return m
    if t is aten.slice.Tensor:
        dim, start, _, step = _slice_args(node)
        return m[:dim] + (m[dim] * step + start,) + m[dim + 1:]
    if t is aten.select.int:
        dim, index = a[1] % rank, a[2]
        index = index + src[dim] if index < 0 else index
        return m[:dim] + (Affine.constant(index),) + m[dim:]
    if t is aten.permute.default:
        out: List[Optional[Affine]] = [None] * rank
        for j, d in enumerate(a[1]):
            out[d % rank] = m[j]
        return tuple(out)
    if t in (aten.transpose.int, aten.t.default):
        d0, d1 = (a[1] % rank, a[2] % rank) if t is aten.transpose.int else (0, min(1, rank - 1))
        out = list(m)
        out[d0], out[d1] = m[d1], m[d0]
        return tuple(out)
    if t is aten.unsqueeze.default:
        d = a[1] % (rank + 1)
        return m[:d] + m[d + 1:]
    if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        dims = {d % rank for d in (a[1] if t is aten.squeeze.dims else [a[1]])} if t is not aten.squeeze.default \
            else {d for d in range(rank) if src[d] == 1}
        dims = {d for d in dims if src[d] == 1}
        it = iter(m)
        return tuple(Affine.constant(0) if d in dims else next(it) for d in range(rank))
    if t is aten.expand.default:
        lead = len(m) - rank
        return tuple(Affine.constant(0) if src[d] == 1 else m[lead + d] for d in range(rank))
    # view / reshape: through the flat (row-major) index; only sizes after the first enter the strides
    flat = Affine.constant(0)
    for c, stride in zip(m, _row_major_strides(_shape(node))):
        flat = flat + c * stride
    coords = []
    for d, stride in enumerate(_row_major_strides(src)):
        c = flat.floordiv(stride, sizes) if stride != 1 else flat
        coords.append(c if d == 0 else c.mod(src[d], sizes))
    return tuple(coords)


def _row_major_strides(shape: Sequence[int]) -> List[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def _cat_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % node.meta["val"].dim()  # stack too: its new dim is a dim of the result


def cat_branches(node: fx.Node, m: Map) -> List[Tuple[fx.Node, Map, Tuple[Affine, int, Optional[int]]]]:
    """(source, its coordinates, guard lo <= expr < hi) for each source of a cat or stack; the last source's
    guard has no upper end (the result's end; its size may be symbolic)."""
    dim = _cat_dim(node)
    if node.target is aten.stack.default:  # stack: source k is the slice k of the new dim
        n = len(node.args[0])
        return [(src, m[:dim] + m[dim + 1:], (m[dim], k, k + 1 if k < n - 1 else None))
                for k, src in enumerate(node.args[0])]
    sources = [x for x in node.args[0] if x.meta["val"].dim() == len(m) and _shape(x)[dim] != 0]
    out, offset = [], 0
    for k, src in enumerate(sources):
        last = k == len(sources) - 1
        size = _shape(src)[dim]
        out.append((src, m[:dim] + (m[dim] - offset,) + m[dim + 1:], (m[dim], offset, None if last else offset + size)))
        offset = offset + size if not last else offset
    return out


def written_slice(node: fx.Node, m: Map) -> Tuple[fx.Node, fx.Node, Map, Tuple[Affine, int, Optional[int]]]:
    """slice_scatter / select_scatter: (base, src, src's coordinates at `m`, the guard where `m` reads src)."""
    base, src = node.args[0], node.args[1]
    rank = len(m)
    if node.target is aten.select_scatter.default:
        dim, index = node.args[2] % rank, node.args[3]
        size = _shape(node)[dim]
        index = index + size if index < 0 and isinstance(size, int) else index
        return base, src, m[:dim] + m[dim + 1:], (m[dim], index, index + 1)
    dim, start, end, _ = _slice_args(node, _shape(node))
    size = _shape(node)[dim]
    if end is not None and isinstance(end, int) and end < 0 and isinstance(size, int):
        end += size
    if end is not None and isinstance(size, int) and isinstance(end, int) and end >= size:
        end = None  # to the end (a sentinel like 2**63 - 1)
    return base, src, m[:dim] + (m[dim] - start,) + m[dim + 1:], (m[dim], start, end)


Pick = Tuple[fx.Node, Map, int]  # (ids node, the ids' coordinates, the table dim its values pick)


def gather_parts(node: fx.Node, m: Map) -> Tuple[fx.Node, List[Pick], Map]:
    """(table, its picks, the table's coordinates with a placeholder at each picked dim)."""
    t, a = node.target, node.args
    if t is aten.embedding.default:
        table, ids = a[0], a[1]
        return table, [(ids, m[:-1], 0)], (Affine.constant(0), m[-1])
    if t is aten.index.Tensor:  # x[i0, i1, ..]: the ids broadcast together, their dims lead the result
        table, ids = a[0], list(a[1])
        r = max(i.meta["val"].dim() for i in ids)
        picks = [(i, _broadcast_map(m[:r], _shape(i)), d) for d, i in enumerate(ids)]
        return table, picks, (Affine.constant(0),) * len(ids) + m[r:]
    if t is aten.index_select.default:
        table, dim, ids = a[0], a[1] % len(m), a[2]
        return table, [(ids, (m[dim],), dim)], m
    table, dim, ids = a[0], a[1] % len(m), a[2]  # gather: ids has the result's shape
    return table, [(ids, m, dim)], m


def wraps_negative_ids(node: fx.Node) -> bool:
    """x[ids] takes a negative id from the end, as Python does; the other gathers raise for one."""
    return node.target is aten.index.Tensor


def _broadcast_map(m: Map, shape: Tuple) -> Map:
    """The coordinates of an operand of `shape` broadcast (right-aligned) to the point `m`."""
    lead = len(m) - len(shape)
    return tuple(Affine.constant(0) if s == 1 else m[lead + j] for j, s in enumerate(shape))


def arange_value(node: fx.Node, m: Map) -> Affine:
    a = [x for x in node.args]
    start, step = (0, 1) if len(a) == 1 else (a[0], a[2] if len(a) > 2 else 1)
    return m[0] * step + start
