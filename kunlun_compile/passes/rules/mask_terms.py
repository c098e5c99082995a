"""attention_mask: a mask written as a conjunction of index-grid terms -> kunlun::attention_mask.

HF transformers builds its masks (`masking_utils`) from small functions of broadcast (batch, head, q, kv) index
grids, combined with `&`: causal `kv <= q`, the sliding window `kv > q - w`, padding `pad[b, kv]`, started from
`new_ones(())`; then `where(mask, 0, min)` makes it additive for attention.  Hand-written models spell the same
terms in other orders and directions (`q >= kv`, `q - kv < w`).  So the mask is recognised by reading the graph,
not by tracing one pattern per order: every root of an `&` tree of bool tensors (and a lone comparison) is
flattened into its terms, each term is read as one of
- a comparison of an affine q grid with an affine kv grid (`src + c`, laid along dim -2 / -1 by unsqueezes),
  normalised to `kv - q <= c` (causal when c = 0, shifted otherwise) or `kv - q > -w` (window w);
- `pad[batch grid, kv grid]` of a bool [B, S] tensor, or that tensor unsqueezed to [B, 1.., S] (padding);
- a bool `new_ones` / `ones` (the conjunction's start),
and the whole becomes one `kunlun::attention_mask` (additive directly when its only use is `where(m, 0, v)`).
A root holding a comparison of grids that is none of these is left as written, with a near miss saying which
term was not understood.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple, Union

import torch
import torch.fx as fx

from ...utils import recompile
from ..manager import PassOutcome
from ..rewrites import mark_replacement, rewrite_allowed
from . import guards as g

aten = torch.ops.aten
FAMILY = "attention_mask"
RULE = "mask_terms"
_ANDS = (aten.bitwise_and.Tensor, aten.logical_and.default)
_COMPARISONS = {aten.le.Tensor: "<=", aten.lt.Tensor: "<", aten.ge.Tensor: ">=", aten.gt.Tensor: ">"}
_FLIPPED = {"<=": ">=", "<": ">", ">=": "<=", ">": "<"}
_ONES = (aten.new_ones.default, aten.ones.default, aten.ones_like.default)
_LAYOUT_ONLY = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


@dataclasses.dataclass(frozen=True)
class Grid:
    """`source + offset`, laid along one dim of the mask by unsqueezes (`_axis_of` says which)."""
    source: fx.Node  # 1-D int
    offset: int


def _grid(node) -> Union[Grid, str]:
    """Read `node` as an affine index grid, or say why not."""
    offset = 0
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and isinstance(node.args[1], int) \
                and not isinstance(node.args[1], bool):
            offset += node.args[1] if node.target is aten.add.Tensor else -node.args[1]
            node = node.args[0]
        elif node.target in _LAYOUT_ONLY or node.target is aten._to_copy.default and \
                _val(node).dtype in (torch.int32, torch.int64):
            node = node.args[0]
        else:
            break
    v = _val(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.dtype not in (torch.int32, torch.int64):
        what = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
        return f"{getattr(node, 'name', node)} is not a 1-D integer index ({what})"
    return Grid(node, offset)


def _axis_of(grid_node: fx.Node) -> Optional[int]:
    """The one dim along which the grid value `grid_node` (as broadcast into the term) varies; where no dim
    has a size other than 1 (one query, one key), the dim its unsqueezes laid its source on."""
    v = _val(grid_node)
    big = [d - v.dim() for d, size in enumerate(v.shape) if not g.known_equal(size, 1)]
    if not big:
        return _placed_axis(grid_node)
    return big[0] if len(big) == 1 else None


def _placed_axis(node: fx.Node) -> Optional[int]:
    """The dim (negative) that the 1-D source of grid `node` lies on, replayed from the unsqueezes and expands
    between them (None through a view or reshape, which may move it)."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in (aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default):
            chain.append(node)
        elif not (node.target in (aten.add.Tensor, aten.sub.Tensor) and isinstance(node.args[1], int)
                  or node.target is aten._to_copy.default):
            break
        node = node.args[0]
    v = _val(node)
    if not isinstance(v, torch.Tensor) or v.dim() != 1:
        return None
    position, rank = 0, 1
    for op in reversed(chain):
        if op.target is aten.unsqueeze.default:
            d = op.args[1] + rank + 1 if op.args[1] < 0 else op.args[1]
            position, rank = position + (d <= position), rank + 1
        elif op.target is aten.expand.default:  # new leading dims only
            position, rank = position + len(op.args[1]) - rank, len(op.args[1])
        else:  # a view that only adds or drops 1s: the source's dim is its one -1 (`q.view(-1, 1)`)
            shape = list(op.args[1])
            if sum(1 for s in shape if not (isinstance(s, int) and s == 1)) != 1 or -1 not in shape:
                return None
            position, rank = shape.index(-1), len(shape)
    return position - rank


@dataclasses.dataclass
class Mask:
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    shift: Optional[int] = None  # k positions are kv - shift (a causal term's c)
    windows: List[int] = dataclasses.field(default_factory=list)  # c of `kv - q > c` terms
    # (pad [B, S], the kv grid's offset it is read at; None: read by column, as a broadcast view)
    padding: List[Tuple[fx.Node, Optional[int]]] = dataclasses.field(default_factory=list)
    comparisons: int = 0


def _positions(mask: Mask, grid: Grid, axis: int) -> Optional[str]:
    """Record the q (axis -2) or kv (axis -1) source, which must be one node over the whole mask."""
    if axis not in (-1, -2):
        return f"a grid along dim {axis}, not the mask's q (-2) or kv (-1) dim"
    slot = "q" if axis == -2 else "k"
    held = getattr(mask, slot)
    if held is not None and held is not grid.source:
        return f"two different {slot} position sources ({held.name}, {grid.source.name})"
    setattr(mask, slot, grid.source)
    return None


def _comparison(mask: Mask, node: fx.Node) -> Optional[str]:
    a, b = node.args[:2]
    if not all(isinstance(x, fx.Node) for x in (a, b)):
        return f"{node.name} compares with a constant"
    rel = _COMPARISONS[node.target]
    ga, gb = _grid(a), _grid(b)
    for gr in (ga, gb):
        if isinstance(gr, str):
            return f"{node.name}: {gr}"
    axis_a, axis_b = _axis_of(a), _axis_of(b)
    if {axis_a, axis_b} != {-1, -2}:
        return f"{node.name} does not compare a q grid (dim -2) with a kv grid (dim -1)"
    if axis_a == -2:  # written q REL kv: as kv REL' q
        ga, gb, rel = gb, ga, _FLIPPED[rel]
    for gr, axis in ((ga, -1), (gb, -2)):
        reason = _positions(mask, gr, axis)
        if reason:
            return reason
    c = gb.offset - ga.offset  # kv_src REL q_src + c
    mask.comparisons += 1
    if rel in ("<=", "<"):  # kv - q <= c  (< c is <= c - 1)
        c = c if rel == "<=" else c - 1
        if mask.shift is not None and mask.shift != c:
            return f"two causal bounds (kv - q <= {mask.shift} and <= {c})"
        mask.shift = c
    else:  # kv - q > c  (>= c is > c - 1): a window of -c
        mask.windows.append(c if rel == ">" else c - 1)
    return None


def _padding(mask: Mask, node: fx.Node) -> Optional[str]:
    pad, indices = node.args[0], node.args[1]
    pv = _val(pad)
    if pv.dtype != torch.bool or pv.dim() != 2 or len(indices) != 2 or any(i is None for i in indices):
        return f"{node.name} indexes a {pv.dtype} {tuple(pv.shape)} tensor, not a bool [batch, kv] padding mask"
    batch, kv = (_grid(i) for i in indices)
    for gr in (batch, kv):
        if isinstance(gr, str):
            return f"{node.name}: {gr}"
    if _axis_of(indices[1]) != -1:
        return f"{node.name} reads the padding mask along dim {_axis_of(indices[1])}, not kv's"
    if batch.source.target is not aten.arange.default or batch.offset or len(batch.source.args) != 1 \
            or not g.known_equal(batch.source.args[0], pv.shape[0]) or _val(indices[0]).dim() < 3:
        return f"{node.name} reads the padding mask at rows other than the batch's own"
    reason = _positions(mask, kv, -1)
    if reason:
        return reason
    mask.padding.append((pad, kv.offset))
    return None


def _broadcast_padding(mask: Mask, node: fx.Node) -> Optional[str]:
    """A bool [B, S] tensor laid out as [B, 1.., S] by views: column j of the mask is key j."""
    src = node
    while src.op == "call_function" and src.target in _LAYOUT_ONLY:
        src = src.args[0]
    sv, v = _val(src), _val(node)
    if sv.dtype != torch.bool or sv.dim() != 2 or v.dim() < 3 or not (g.known_equal(v.shape[0], sv.shape[0])
                                          and g.known_equal(v.shape[-1], sv.shape[1])
                                          and all(g.known_equal(d, 1) for d in v.shape[1:-1])):
        return f"{node.name} (bool {tuple(v.shape)}) is not a causal, window or padding term"
    mask.padding.append((src, None))
    return None


def _terms(root: fx.Node) -> List[fx.Node]:
    if root.op == "call_function" and root.target in _ANDS:
        return [t for a in root.args[:2] for t in _terms(a)]
    return [root]


def _read(root: fx.Node) -> Union[Mask, str]:
    mask = Mask()
    for term in _terms(root):
        if not isinstance(term, fx.Node):
            return f"a term {term!r} is not a tensor"
        if term.op == "call_function" and term.target in _ONES and _val(term).dtype == torch.bool:
            continue
        if term.op == "call_function" and term.target in _COMPARISONS:
            reason = _comparison(mask, term)
        elif term.op == "call_function" and term.target is aten.index.Tensor:
            reason = _padding(mask, term)
        elif term.op == "call_function" and term.target in _LAYOUT_ONLY:
            reason = _broadcast_padding(mask, term)
        else:
            reason = f"{term.name} ({term.target}) is not a causal, window or padding term"
        if reason:
            return reason
    if not mask.comparisons or mask.q is None or mask.k is None:
        return "no comparison of a q grid with a kv grid"
    return mask


def _is_root(node: fx.Node) -> bool:
    v = _val(node)
    if node.op != "call_function" or not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.dim() < 2:
        return False
    if node.target not in _ANDS and node.target not in _COMPARISONS:
        return False
    return not node.users or any(u.target not in _ANDS for u in node.users)


def _mentions_grids(root: fx.Node) -> bool:
    """Worth a near miss: some term compares two integer tensors (an index grid, most likely)."""
    return any(t.op == "call_function" and t.target in _COMPARISONS and
               all(isinstance(a, fx.Node) and not _val(a).is_floating_point() for a in t.args[:2])
               for t in _terms(root) if isinstance(t, fx.Node))


def _additive(root: fx.Node) -> Optional[Tuple[List[fx.Node], torch.dtype, float]]:
    """(the wheres, their dtype, the masked value) when every use of the mask is `where(mask, 0, value)` with one
    dtype and value (HF makes one per layer from the same mask)."""
    found = set()
    for use in root.users:
        if use.target is not aten.where.self or use.args[0] is not root or not _val(use).is_floating_point():
            return None
        consts = []
        for a in use.args[1:3]:
            if isinstance(a, fx.Node) and a.target is aten.scalar_tensor.default:
                consts.append(a.args[0])
            elif isinstance(a, (int, float)) and not isinstance(a, bool):
                consts.append(a)
            else:
                return None
        if consts[0] != 0:
            return None
        found.add((_val(use).dtype, float(consts[1]), tuple(_val(use).shape)))
    if len(found) != 1:
        return None
    dtype, value, _ = found.pop()
    return list(root.users), dtype, value


def _replace(gm: fx.GraphModule, root: fx.Node, mask: Mask) -> Union[bool, str]:
    """True: replaced; False: a bisect's limit stopped it; else why the kernel cannot take it."""
    shift = mask.shift or 0
    windows = {shift - c for c in mask.windows}  # kv - q > c  ->  q - (kv - shift) < shift - c
    if len(windows) > 1 or any(w <= 0 for w in windows):
        return f"window bounds {sorted(windows)} are not one positive width"
    window = windows.pop() if windows else 0
    pads = {(p, off) for p, off in mask.padding}
    if len(pads) > 1:
        return "two padding masks"
    out = _val(root)
    pad, pad_offset = pads.pop() if pads else (None, None)
    q_len, k_len = out.shape[-2], out.shape[-1]
    if not (g.known_equal(_val(mask.q).shape[0], q_len) and g.known_equal(_val(mask.k).shape[0], k_len)):
        return f"position sources {tuple(_val(mask.q).shape)}, {tuple(_val(mask.k).shape)} do not span the mask"
    if pad is not None and pad_offset is None and not g.known_equal(_val(pad).shape[1], k_len):
        return f"the padding mask has {_val(pad).shape[1]} keys, the mask {k_len}"
    additive = _additive(root)
    targets = additive[0] if additive else [root]
    target = targets[0]
    if not rewrite_allowed(f"{FAMILY}/{RULE}: {root.name}", [root]):
        return False
    graph = gm.graph
    with graph.inserting_before(target):
        q, k = mask.q, mask.k
        if shift:
            k = graph.call_function(aten.sub.Tensor, (k, shift))
        key_valid = None
        if pad is not None:
            batch, key_valid = _val(pad).shape[0], pad
            if pad_offset is not None and not _counts_columns(mask.k, pad_offset, _val(pad).shape[1]):
                # read at the kv positions: key j is pad[:, kv[j] + offset]
                kv_index = mask.k if not pad_offset else graph.call_function(aten.add.Tensor, (mask.k, pad_offset))
                key_valid = graph.call_function(aten.index_select.default, (pad, 1, kv_index))
            q = graph.call_function(aten.expand.default, (q, [batch, q_len]))
            k = graph.call_function(aten.expand.default, (k, [batch, k_len]))
        dtype, value = (additive[1], additive[2]) if additive else (torch.bool, float("-inf"))
        made = graph.call_function(torch.ops.kunlun.attention_mask.default,
                                   (q, k, key_valid, mask.shift is not None, window, dtype, value))
        lead = [1] * (out.dim() - 2) if pad is None else [_val(pad).shape[0]] + [1] * (out.dim() - 3)
        shaped = graph.call_function(aten.view.default, (made, lead + [q_len, k_len]))
        final = graph.call_function(aten.expand.default, (shaped, list(_val(target).shape)))
    _fill_meta(gm, target)
    for old in targets:
        mark_replacement(old, final, RULE)
        old.replace_all_uses_with(final)
    return True


def _counts_columns(kv: fx.Node, offset: int, width) -> bool:
    """`kv + offset` is 0, 1, .., width - 1: reading the padding mask at the kv positions reads it whole."""
    return offset == 0 and kv.target is aten.arange.default and len(kv.args) == 1 and g.known_equal(kv.args[0], width)


def _fill_meta(gm: fx.GraphModule, target: fx.Node) -> None:
    """Fake values for the nodes just made (inserted before `target`), by running their ops on fake inputs."""
    for node in gm.graph.nodes:
        if node is target:
            return
        if node.op == "call_function" and "val" not in node.meta:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)


def recognise(gm: fx.GraphModule) -> PassOutcome:
    """Every mask root in the graph made one kernel where its terms are understood; a near miss where not."""
    outcome = PassOutcome()
    for root in [n for n in gm.graph.nodes if _is_root(n)]:
        mask = _read(root)
        done = mask if isinstance(mask, str) else _replace(gm, root, mask)
        if done is True:
            outcome.matches += 1
            outcome.patterns[FAMILY] = outcome.patterns.get(FAMILY, 0) + 1
        elif isinstance(done, str) and _mentions_grids(root):
            outcome.near_misses.append(f"{FAMILY}: {root.name} (bool {tuple(_val(root).shape)} mask of index "
                                       f"comparisons) left unfused; {done}")
    gm.graph.eliminate_dead_code()
    recompile(gm)
    return outcome
