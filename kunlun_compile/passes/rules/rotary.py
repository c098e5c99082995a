"""Rotary embedding, stage one: every spelling of one tensor's rotation -> the `kunlun::rotary` primitive.

Each rule here is small and local: one rotation of one tensor, as some model writes it (the halves cut by
slices or by `chunk`, GPT-J pairs, `rotate_half` or the two products written out without `-x2` against
half-width tables, pairs written out de-interleaved, the rotation on an upcast x).  `WIDEN` then folds partial
rotary (the rotated slice `cat` with the passed-through rest) into the primitive's `rotary_dim`.  The prologue
rules (`prologue.py`, `hf_prologue.py`) fuse primitives with their Q/K norms; `LOWER` puts every primitive
nothing fused back as its reference (`ops/rotary.py`), bit for bit the model's arithmetic, with a near miss
saying which spelling it was and why no prologue rule took it.  A new spelling is one more search function
below, not one more variant of every prologue rule.
"""
from __future__ import annotations

from typing import List

import torch
import torch.fx as fx

from ...ops.rotary import reference
from ..canonical import known_contiguous
from ..explain_anchors import val
from ..pattern_engine import Bindings, Refusal, Rewrite
from ..rewrites import MADE_BY, REFUSED, REPLACES
from . import guards as g

aten = torch.ops.aten
ROTARY = torch.ops.kunlun.rotary.default
_D = 16  # example head width; the tables' width is read from the match


# ---- how the halves are cut ------------------------------------------------------------------------

def _sliced_halves(x):
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _chunked_halves(x):
    return torch.chunk(x, 2, dim=-1)


def _pairs(x):
    return x[..., ::2], x[..., 1::2]


# ---- the spellings -----------------------------------------------------------------------------------

def _with_rotate_half(cut, join):
    """`x cos + rotate(x) sin`, rotate(x) = (-x2, x1) joined back: HF's `rotate_half`, Cohere's pairs."""
    def rotation(x, cos, sin):
        x1, x2 = cut(x)
        return x * cos + join(-x2, x1) * sin
    return rotation


def _upcast_with_rotate_half(cut, join):
    """The same in float32 on an upcast x (Ernie-4.5: `x.float() cos + rotate(x).float() sin`)."""
    def rotation(x, cos, sin):
        x1, x2 = cut(x)
        return x.float() * cos + join(-x2, x1).float() * sin
    return rotation


def _written_out(cut, join):
    """The two products written out, half-width tables: `(x1 cos - x2 sin, x2 cos + x1 sin)` joined
    (GptOss; vLLM's `forward_native`)."""
    def rotation(x, cos, sin):
        x1, x2 = cut(x)
        return join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    return rotation


def _written_out_with_rest(x, cos, sin):
    """Partial rotary in one `cat`: the two written-out products and the passed-through rest side by side
    (`cat([x1 cos - x2 sin, x2 cos + x1 sin, x[..., 2h:]])`, h the tables' width)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def _complex_pairs(x, freqs):
    """Meta's Llama reference / torchtitan / HF Llama4 and DeepseekV2: pairs as complex numbers times a complex
    table, in float32, read back as real pairs and cast to x's dtype (a no-op in float32)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).type_as(x)


def _complex_pairs_kept_float(x, freqs):
    """The same, the result left in float32 (half-precision x only: in float32 it is the form above)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2)


def _cat(a, b):
    return torch.cat((a, b), dim=-1)


def _interleave(a, b):
    return torch.stack((a, b), dim=-1).flatten(-2)


# ---- replacements ------------------------------------------------------------------------------------

def widened_tables(cos, sin, neox: bool):
    """Half-width tables (one angle per pair) as the primitive takes them: each rotated element's angle."""
    join = _cat if neox else _interleave
    return join(cos, cos), join(sin, sin)


def _as_primitive(x, cos, sin, *, neox: bool, upcast: bool = False, half_tables: bool = False):
    if half_tables:
        cos, sin = widened_tables(cos, sin, neox)
    return torch.ops.kunlun.rotary(x.float() if upcast else x, cos, sin, neox, x.shape[-1])


def _guard(b: Bindings, half_tables: bool):
    x, cos, sin = b.val("x"), b.val("cos"), b.val("sin")
    d = x.shape[-1]
    width = cos.shape[-1] * (2 if half_tables else 1)
    (out,) = [n.meta["val"] for n in b.match.output_nodes() if n is not None]
    reason = g.first(
        # the pairs' flatten may be merged with a view after it: the match would then end in another shape
        None if g.same_shape(out, x) else f"the rotation ends in {tuple(out.shape)}, not x's {tuple(x.shape)}",
        g.float_dtype(x, "x"), g.float_dtype(cos, "cos"), g.same_dtype(cos, sin, "cos and sin"),
        None if g.same_shape(cos, sin) else f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ",
        None if isinstance(d, int) and d % 2 == 0 else f"rotated width {d} is not a static even size",
        None if g.known_equal(width, d) else
        f"cos width {cos.shape[-1]} is not {'half of ' if half_tables else ''}the rotated width {d}",
        _grows(x, cos))
    return Refusal(reason) if reason else {}


def _with_rest_guard(b: Bindings):
    """The three slices cut the row at h and 2h, h the tables' width."""
    x, cos = b.val("x"), b.val("cos")
    half, d = cos.shape[-1], x.shape[-1]
    if not (isinstance(half, int) and isinstance(d, int) and 0 < 2 * half <= d):
        return Refusal(f"tables of width {half} do not rotate a static part of the row of {d}")
    for s in b.nodes(aten.slice.Tensor):
        start = s.args[2] if len(s.args) > 2 and s.args[2] is not None else 0
        width = s.meta["val"].shape[-1]
        if (start, width) not in ((0, half), (half, half), (2 * half, d - 2 * half)):
            return Refusal(f"a slice [{start}:{start} + {width}] does not cut the row at {half} and {2 * half}")
    reason = g.first(g.float_dtype(x, "x"), g.float_dtype(cos, "cos"), g.same_dtype(cos, b.val("sin"), "cos and sin"),
                     None if g.same_shape(cos, b.val("sin")) else "cos and sin differ in shape", _grows(x, cos))
    return Refusal(reason) if reason else {}


def _complex_guard(b: Bindings):
    """The row width is read off the rotation's output: in float32 (no upcast in between) canonicalisation
    folds the model's per-head view into the pairs' view, so x may be the [.., heads * head_dim] projection."""
    x, freqs = b.val("x"), b.val("freqs")
    (out,) = [n.meta["val"] for n in b.match.output_nodes() if n is not None]
    d = out.shape[-1]
    if not (isinstance(d, int) and d % 2 == 0):
        return Refusal(f"rotated width {d} is not a static even size")
    heads = None if g.same_shape(out, x) else tuple(out.shape)  # x is the projection the per-head view folded into
    if heads is not None and not all(isinstance(n, int) for n in heads):
        return Refusal(f"x {tuple(x.shape)} is viewed per head as {heads}, not a static shape")
    reason = g.first(
        g.float_dtype(x, "x"),
        None if freqs.dtype == torch.complex64 else f"the complex table is {freqs.dtype}, not complex64",
        None if g.known_equal(freqs.shape[-1] * 2, d) else f"the complex table's width {freqs.shape[-1]} is not "
                                                            f"half the rotated width {d}",
        _grows(out, freqs))
    return Refusal(reason) if reason else {"head_dim": d, "heads": heads}


def _complex_tables(freqs):
    """cos and sin of each pair, widened to each rotated element (GPT-J layout)."""
    parts = torch.view_as_real(freqs)
    return widened_tables(parts[..., 0], parts[..., 1], False)


def _complex_primitive_kept_float(x, freqs, *, head_dim, heads):
    cos, sin = _complex_tables(freqs)
    x_heads = x if heads is None else x.reshape(heads)
    return torch.ops.kunlun.rotary(x_heads.float(), cos, sin, False, head_dim)


def _complex_primitive(x, freqs, *, head_dim, heads):
    return _complex_primitive_kept_float(x, freqs, head_dim=head_dim, heads=heads).to(x.dtype)


def _complex_inputs(dtype):
    angles = torch.rand(1, 5, 1, _D // 2)
    return torch.randn(2, 5, 3, _D, dtype=dtype), torch.polar(torch.ones_like(angles), angles)


def _halves_out_primitive(x, cos, sin):
    """Pairs rotated, written out de-interleaved (DeepSeek-V3's `apply_rotary_pos_emb_interleave`: the even
    results then the odd ones): the pairs' rotation, then that permutation of its result (a copy after the
    primitive, which the prologue kernel's output then feeds)."""
    out = _as_primitive(x, cos, sin, neox=False, half_tables=True)
    return out.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _partial_primitive(x, cos, sin):
    cos, sin = widened_tables(cos, sin, True)
    return torch.ops.kunlun.rotary(x, cos, sin, True, cos.shape[-1])


def _grows(x, cos):
    """Why cos would broadcast x to a larger shape (the primitive's result has x's shape), else None."""
    if cos.dim() > x.dim():
        return f"cos {tuple(cos.shape)} has more dims than x {tuple(x.shape)}"
    lead = x.shape[x.dim() - cos.dim():-1]
    if all(g.known_equal(c, 1) or g.known_equal(c, s) for c, s in zip(cos.shape[:-1], lead)):
        return None
    return f"cos {tuple(cos.shape)} broadcasts x {tuple(x.shape)} to a larger shape"


def _inputs(dtype, half_tables: bool, rank: int = 4):
    """HF's [B, H, S, D] with [B, 1, S, w] tables, or vLLM's [T, H, D] with [T, 1, w] (only the pairs'
    flatten, a view, spells the rank into the pattern)."""
    width = _D // 2 if half_tables else _D
    lead = (2, 3, 5) if rank == 4 else (5, 3)
    table = lead[:-2] + (1, lead[-1]) if rank == 4 else (5, 1)
    return (torch.randn(*lead, _D, dtype=dtype), torch.randn(*table, width, dtype=dtype),
            torch.randn(*table, width, dtype=dtype))


_CUTS = {"slices": _sliced_halves, "chunk": _chunked_halves}


_WRITTEN_OUT = "without rotate_half (x1*cos - x2*sin, x2*cos + x1*sin, no -x2)"
SPELLINGS = {}  # rule name -> the spelling in words, for near misses


def _spelling(kind: str, form: str) -> str:
    if kind == "written_out_":
        return (f"even/odd slices {_WRITTEN_OUT} into a stack" if form.startswith("pairs")
                else f"halves {_WRITTEN_OUT} into a cat")
    words = "pairs (stack)" if form.startswith("pairs") else f"neox halves by {form.split('_')[0]} (cat)"
    return f"{words}, in float32 on an upcast x" if kind == "upcast_" else words


def _rules():
    rules = []
    for kind, spell, half_tables, upcast, needs in (
            ("", _with_rotate_half, False, False, aten.neg.default),
            ("upcast_", _upcast_with_rotate_half, False, True, aten.neg.default),
            ("written_out_", _written_out, True, False, aten.sub.Tensor)):
        forms = [(f"{cut}_halves", c, _cat, True, 4) for cut, c in _CUTS.items()]
        forms += [("pairs", _pairs, _interleave, False, 4), ("pairs_per_token", _pairs, _interleave, False, 3)]
        for form, cut, join, neox, rank in forms:
            SPELLINGS[f"rotary_{kind}{form}"] = _spelling(kind, form)
            rules.append(Rewrite(
                family="norm_rope_gate", name=f"rotary_{kind}{form}", search=spell(cut, join),
                replace=lambda x, cos, sin, neox=neox, upcast=upcast, half_tables=half_tables: _as_primitive(
                    x, cos, sin, neox=neox, upcast=upcast, half_tables=half_tables),
                example_inputs=lambda dtype, half_tables=half_tables, rank=rank: _inputs(dtype, half_tables, rank),
                guard=lambda b, half_tables=half_tables: _guard(b, half_tables),
                dtypes=(torch.bfloat16, torch.float16) if upcast else (torch.float32, torch.bfloat16, torch.float16),
                needs=(needs, aten.stack.default if join is _interleave else aten.cat.default)))
    for name, search, replace, dtypes in (
            ("rotary_complex_pairs", _complex_pairs, _complex_primitive,
             (torch.float32, torch.bfloat16, torch.float16)),
            ("rotary_complex_pairs_kept_float", _complex_pairs_kept_float, _complex_primitive_kept_float,
             (torch.bfloat16, torch.float16))):
        SPELLINGS[name] = "pairs as complex numbers (view_as_complex) times a complex table, in float32"
        rules.append(Rewrite(family="norm_rope_gate", name=name, search=search, replace=replace,
                             example_inputs=_complex_inputs, guard=_complex_guard, dtypes=dtypes,
                             needs=(aten.view_as_complex.default, aten.view_as_real.default)))
    name = "rotary_written_out_pairs_to_halves"
    SPELLINGS[name] = f"even/odd slices {_WRITTEN_OUT} into a cat (results de-interleaved)"
    rules.append(Rewrite(family="norm_rope_gate", name=name, search=_written_out(_pairs, _cat),
                         replace=_halves_out_primitive, example_inputs=lambda dtype: _inputs(dtype, True),
                         guard=lambda b: _guard(b, True), needs=(aten.sub.Tensor, aten.cat.default)))
    name = "rotary_written_out_halves_with_rest"
    SPELLINGS[name] = f"halves {_WRITTEN_OUT} and the passed-through rest in one cat"
    rules.append(Rewrite(family="norm_rope_gate", name=name, search=_written_out_with_rest,
                         replace=_partial_primitive, example_inputs=lambda dtype: _partial_inputs(dtype, _D // 4),
                         guard=_with_rest_guard, needs=(aten.sub.Tensor, aten.cat.default, aten.slice.Tensor)))
    return rules


RECOGNISE = _rules()


def _feeds_rotations_only(node: fx.Node) -> bool:
    return bool(node.users) and all(u.target is ROTARY or (u.target in _TABLE_OPS and _feeds_rotations_only(u))
                                    for u in node.users)


def share_tables(gm: fx.GraphModule) -> int:
    """One table per (cos, sin) pair: each half-width rotation widened its tables itself (`cat((cos, cos))`),
    and model code may unsqueeze them once per rotation; q's and k's rotations must read the same nodes for a
    prologue rule to see one pair of tables.  In graph order, so a merged input makes its users equal."""
    seen, merged = {}, 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _TABLE_OPS + (aten.unsqueeze.default,) \
                or not _feeds_rotations_only(node):
            continue
        key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        size = node.meta.get("val")
        if node.target is aten.sym_size.int and isinstance(size, torch.SymInt):
            key = (node.target, str(size.node.expr))  # q's and k's row counts: one symbol, read off two nodes
        first = seen.setdefault(key, node)
        if first is node:
            continue
        if node.target is aten.unsqueeze.default and _rotations_after(first, node, order):
            seen[key] = node  # a later layer's: the next equal unsqueeze may pair with this one
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        merged += 1
    return merged


# Only the widening's own ops are merged unconditionally.  A model's `cos.unsqueeze(1)` of tables computed once
# per forward is equal in every layer: merged, every layer's k would be a candidate for each layer's q (the
# engine passes over the ones that would close a cycle, `pattern_engine._DistinctOutputs`, but tries them one
# by one: layers x layers matches), so an unsqueeze is merged only into one whose rotations do not feed its own
# (the same layer's q and k).
# (`sym_size`: under dynamic shapes a widened table's view reads its sizes off the table it was built from)
# (`view_as_real`, `select`: the cos and sin parts of a complex table)
_TABLE_OPS = (aten.cat.default, aten.stack.default, aten.view.default, aten.sym_size.int, aten.view_as_real.default,
              aten.select.int)


def _rotations_after(first: fx.Node, node: fx.Node, order) -> bool:
    """Whether `node`'s rotations depend on a rotation that reads `first` (a later layer).  The walk stops past
    the last of them in graph order: one layer's nodes, not the rest of the model."""
    starts = _rotations_of(first)
    targets = set(_rotations_of(node)) - set(starts)
    last = max((order.get(t, -1) for t in targets), default=-1)
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        for u in n.users:
            if u not in seen and order.get(u, last + 1) <= last:
                seen.add(u)
                stack.append(u)
    return False


def _rotations_of(node: fx.Node) -> List[fx.Node]:
    return [u for u in node.users if u.target is ROTARY] + [
        r for u in node.users if u.target in _TABLE_OPS for r in _rotations_of(u)]


# ---- partial rotary: the rotated slice and the passed-through rest -----------------------------------

_FREE = ((ROTARY, 3), (ROTARY, 4))  # neox and rotary_dim match any value; the guards read them


def _partial(x, cos, sin):
    return torch.cat((torch.ops.kunlun.rotary(x[..., :_D // 2], cos, sin, True, _D // 2), x[..., _D // 2:]), dim=-1)


def _full_with_empty_rest(x, cos, sin):
    """Phi3 at full rotary width: the rotated slice spans the row (cleanup folds it away), the rest is empty."""
    return torch.cat((torch.ops.kunlun.rotary(x, cos, sin, True, _D), x[..., _D:]), dim=-1)


def shared_rotation(b: Bindings):
    """(neox, rotary_dim) of every primitive in a match (q's and k's), or why they differ."""
    found = {tuple(n.args[3:5]) for n in b.nodes(ROTARY)}
    if len(found) != 1:
        return f"q and k are rotated differently: {sorted(found)}"
    return found.pop()


def _rotary_args(b: Bindings):
    (node,) = b.nodes(ROTARY)
    return node.args[3], node.args[4]


def _widen_guard(b: Bindings):
    x = b.val("x")
    neox, rotary_dim = _rotary_args(b)
    d = x.shape[-1]
    if not isinstance(d, int):
        return Refusal(f"the row width {d} is not static")
    for s in b.nodes(aten.slice.Tensor):  # x[..., :r] rotated, x[..., r:] passed through
        start = s.args[2] if len(s.args) > 2 and s.args[2] is not None else 0
        width = s.meta["val"].shape[-1]
        rotated = any(u.target is ROTARY for u in s.users)
        if not (g.known_equal(width, rotary_dim) and start == 0 if rotated
                else start == rotary_dim and g.known_equal(width, d - rotary_dim)):
            return Refusal(f"a slice [{start}:{start} + {width}] of the row does not cut it at rotary_dim "
                           f"{rotary_dim}")
    return {"neox": neox, "rotary_dim": rotary_dim}


def _widened(x, cos, sin, *, neox, rotary_dim):
    return torch.ops.kunlun.rotary(x, cos, sin, neox, rotary_dim)


def _partial_inputs(dtype, rot):
    return (torch.randn(2, 3, 5, _D, dtype=dtype), torch.randn(2, 1, 5, rot, dtype=dtype),
            torch.randn(2, 1, 5, rot, dtype=dtype))


WIDEN = [
    Rewrite(family="norm_rope_gate", name="rotary_partial", search=_partial, replace=_widened,
            example_inputs=lambda dtype: _partial_inputs(dtype, _D // 2), guard=_widen_guard,
            free_arguments=_FREE, needs=(ROTARY, aten.cat.default, aten.slice.Tensor)),
    Rewrite(family="norm_rope_gate", name="rotary_full_with_empty_rest", search=_full_with_empty_rest,
            replace=_widened, example_inputs=lambda dtype: _partial_inputs(dtype, _D), guard=_widen_guard,
            free_arguments=_FREE, needs=(ROTARY, aten.cat.default, aten.slice.Tensor)),
]


# ---- what nothing fused goes back as its reference ---------------------------------------------------

def _primitive(x, cos, sin):
    return torch.ops.kunlun.rotary(x, cos, sin, True, _D)


def _lower_guard(b: Bindings):
    neox, rotary_dim = _rotary_args(b)
    return {"neox": neox, "rotary_dim": rotary_dim}


def _made_by(node: fx.Node):
    """The rule that made a primitive: on the node, or on the end of the layout chain its replacement put after
    it (the de-interleaving permutation of `_halves_out_primitive`)."""
    for _ in range(4):
        if MADE_BY in node.meta or len(node.users) != 1:
            break
        node = next(iter(node.users))
    return node.meta.get(MADE_BY)


def unfused(gm: fx.GraphModule) -> List[str]:
    """A near miss for every primitive no prologue rule took: what spelling it came from, and why."""
    lines = []
    for node in gm.graph.find_nodes(op="call_function", target=ROTARY):
        if node.meta.get(REFUSED):  # a prologue rule's guard said why already
            continue
        x, cos = node.args[0], node.args[1]
        spelling = SPELLINGS.get(_made_by(node), "neox halves" if node.args[3] else "pairs")
        row = x.meta["val"].shape[-1]
        width = "" if isinstance(row, int) and node.args[4] == row else f" over the first {node.args[4]} dims"
        lines.append(f"norm_rope_gate: {node.meta.get(REPLACES, node.name)} (rotary rotation, {spelling}{width}, "
                     f"of {val(x)} with cos {val(_model_table(cos))}) left unfused; {_why_unfused(x)}")
    return lines


def _model_table(cos: fx.Node) -> fx.Node:
    """The model's own table behind one this module widened (`cat((cos, cos))`, pairs stacked and flattened)."""
    node = cos.args[0] if cos.target is aten.view.default else cos
    if node.target in (aten.cat.default, aten.stack.default) and len(set(node.args[0])) == 1:
        return node.args[0][0]
    return cos


def _why_unfused(x: fx.Node) -> str:
    if not (isinstance(x, fx.Node) and x.target in (aten.transpose.int, aten._to_copy.default, aten.mul.Tensor)):
        return ("no pattern of the family covers this spelling of the prologue: its rules take q and k as per-head "
                "views [batch, seq, heads, head_dim], (normed and) transposed to [batch, heads, seq, head_dim], "
                "rotated with one pair of tables")
    return "no prologue rule matched around it (a rule's refusal, if one came close, is listed with the rule's name)"


def _lowered(x, cos, sin, *, neox, rotary_dim):
    """Contiguous, as the primitive's fake said: the views after it were checked against that layout.  Decided
    without guards (`.contiguous()` would guard on the symbolic sizes it reads)."""
    out = reference(x, cos, sin, neox, rotary_dim)
    return out if known_contiguous(out) else out.clone(memory_format=torch.contiguous_format)


LOWER = [Rewrite(family="norm_rope_gate", name="rotary_reference", search=_primitive, replace=_lowered,
                 example_inputs=lambda dtype: _partial_inputs(dtype, _D), guard=_lower_guard, dtypes=(),
                 free_arguments=_FREE, needs=(ROTARY,))]
