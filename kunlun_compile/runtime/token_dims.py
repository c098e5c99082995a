"""Which dimensions are the token dimension, and may a piece run on a padded batch?

Serving calls a model with every token count from 1 up; graphs are captured for
a few sizes only, so a count between two capture sizes is padded up to the next
one.  That is only correct when no real token's result depends on a padded one:
the piece must treat tokens independently.  `why_not_token_wise` proves it op by
op from the symbolic shapes (conservatively: an op it does not know refuses).

The token symbol is the symbolic size of dim 0 of the graph's first tensor input
that has one (vLLM's flattened `[num_tokens, ...]` layout).  Padded values repeat
the last real row, so padded ids, positions and activations stay in range.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from .splitting import op_name

aten = torch.ops.aten


def token_symbol(example_inputs: Sequence[Any]) -> Optional[sympy.Symbol]:
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and isinstance(x.shape[0], torch.SymInt):
            expr = x.shape[0].node.expr
            if isinstance(expr, sympy.Symbol):
                return expr
    return None


def _expr(size) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) else size


def token_dims(val: Any, sym: Optional[sympy.Symbol]) -> List[int]:
    """Dims of a tensor whose size is exactly the token count."""
    if sym is None or not isinstance(val, torch.Tensor):
        return []
    return [d for d, s in enumerate(val.shape) if _expr(s) == sym]


def token_layout(val: Any, sym: Optional[sympy.Symbol]) -> List[Tuple[int, int]]:
    """(dim, rows per token) of every dim that grows with the token count: `n` anywhere (1 row per
    token), `c*n` in dim 0 (token-major: each token's c rows together, as a [n, c] view flattened)."""
    if sym is None or not isinstance(val, torch.Tensor):
        return []
    out = []
    for d, s in enumerate(val.shape):
        e = _expr(s)
        if e == sym:
            out.append((d, 1))
        elif d == 0 and isinstance(e, sympy.Expr) and sym in e.free_symbols:
            coeff = sympy.simplify(e / sym)
            if coeff.is_Integer and coeff > 0:
                out.append((0, int(coeff)))
    return out


def _token_related(val: Any, sym) -> List[int]:
    """Dims whose size involves the token count at all."""
    if sym is None or not isinstance(val, torch.Tensor):
        return []
    return [d for d, s in enumerate(val.shape) if isinstance(_expr(s), sympy.Expr) and sym in _expr(s).free_symbols]


def _odd_dim(val: Any, sym) -> Optional[str]:
    """A dim that involves the token count other than as `n` itself or `c*n` in dim 0 (token-major)."""
    if not isinstance(val, torch.Tensor):
        return None
    for d, s in enumerate(val.shape):
        e = _expr(s)
        if not isinstance(e, sympy.Expr) or sym not in e.free_symbols or e == sym:
            continue
        coeff = sympy.simplify(e / sym)
        if d == 0 and coeff.is_Integer and coeff > 0:
            continue
        return f"size {e} in dim {d}"
    return None


# Ops that move or copy data without mixing tokens, when no `dim` they take is a token dim.
_LAYOUT = {aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze, aten.expand, aten.permute,
           aten.transpose, aten.t, aten.clone, aten._to_copy, aten.alias, aten.detach, aten.lift_fresh_copy,
           aten.split, aten.split_with_sizes, aten.chunk, aten.cat, aten.stack, aten.slice, aten.select,
           aten.unbind, aten.contiguous, aten.copy, aten.view_as_real, aten.view_as_complex, aten.flatten,
           aten.repeat, aten.where, aten.masked_fill, aten.fill, aten.narrow}
# Per-row work along the named dim (must not be a token dim).
_ALONG_DIM = {aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.var_mean, aten.std, aten.prod,
              aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, aten.argmax, aten.argmin,
              aten.max, aten.min, aten.topk, aten.sort, aten.cumsum, aten.cumprod, aten.logsumexp, aten.any,
              aten.all, aten.norm, aten.linalg_vector_norm, aten.gather, aten.index_select, aten.scatter,
              aten.scatter_add, aten.one_hot}
# Fresh tensors whose contents do not depend on the batch (zeros, constants, an arange over tokens).
_FACTORIES = {aten.full, aten.zeros, aten.ones, aten.empty, aten.arange, aten.full_like, aten.zeros_like,
              aten.ones_like, aten.empty_like, aten.scalar_tensor, aten.empty_strided, aten.new_zeros,
              aten.new_ones, aten.new_full, aten.new_empty}
# Writes of rows into another tensor at given indices: padded rows would be written or added in.
_SCATTERS = {aten.scatter, aten.scatter_add, aten.scatter_reduce, aten.index_add, aten.index_copy, aten.index_put,
             aten._index_put_impl, aten.index_fill, aten.masked_scatter}
# Reshapes keep tokens apart only while the token dim is the outermost one, in and out.
_RESHAPES = {aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten._reshape_alias}
# Layout changes that move a token dim without mixing rows.
_MOVES = {aten.permute, aten.transpose, aten.t, aten.expand, aten.unsqueeze, aten.squeeze}
_MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.matmul, aten.linear, aten.baddbmm}
# Size queries: read metadata only.
_METADATA = {aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset}
# kunlun:: ops treat every token (row) on its own; attention_mask is pairwise over positions.
TOKEN_WISE_NAMESPACES = ("kunlun",)


def _packet(target):
    return getattr(target, "overloadpacket", None)


def _dims_arg(node: fx.Node) -> List[int]:
    try:
        norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - no schema: treat as no dim argument
        norm = None
    kwargs = norm.kwargs if norm is not None else {}
    dims = kwargs.get("dim", kwargs.get("dims"))
    if dims is None:
        return []
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return [d for d in dims if isinstance(d, int)]


def _input_tensors(node: fx.Node) -> List[torch.Tensor]:
    return [a.meta.get("val") for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _node_reason(node: fx.Node, sym) -> Optional[str]:
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    name = op_name(node.target) or getattr(node.target, "__name__", str(node.target))
    outs = node.meta.get("val")
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    ins = _input_tensors(node)
    for v in ins + outs:
        odd = _odd_dim(v, sym)
        if odd:
            return f"{name}: {odd}"
    if not any(_token_related(v, sym) for v in ins + outs):
        return None  # no token dim involved: a weight- or constant-only computation
    target, packet = node.target, _packet(node.target)
    if not isinstance(target, torch._ops.OpOverload):
        return None if name.startswith("sym_") or node.target.__module__ in ("_operator", "operator", "math") \
            else f"{name} is not known to treat tokens independently"
    if name == "kunlun::pointwise":
        return _generated_kernel_reason(node, sym)
    if name.split("::")[0] in TOKEN_WISE_NAMESPACES:
        return None
    if torch.Tag.pointwise in target.tags or packet in _FACTORIES or packet in _METADATA:
        return None
    src = ins[0] if ins else None
    if packet in _RESHAPES:
        if any(d != 0 for v in (src, *outs) for d in _token_related(v, sym)):
            return f"{name} reshapes across a token dim that is not the outermost"
        return None
    if packet in _MOVES:
        return None  # a moved token dim stays a token dim; every value's sizes are checked above
    if packet is aten.repeat:
        return _repeat_reason(name, src, node.args[1], sym)
    if packet in _SCATTERS:
        return _scatter_reason(name, node, src, ins[1:], sym)
    if packet is aten.index:
        return None if not _token_related(src, sym) else f"{name} indexes a token-sized tensor"
    if packet in _LAYOUT or packet in _ALONG_DIM:
        rank = src.dim() if isinstance(src, torch.Tensor) else 0
        tok = set(_token_related(src, sym))
        hit = [d % rank if rank else d for d in _dims_arg(node) if (d % rank if rank else d) in tok]
        if hit:
            return f"{name} works along the token dim {hit[0]}"
        return None
    if packet in _MATMULS:
        a, b = (ins[-2], ins[-1]) if len(ins) >= 2 else (None, None)
        if a is not None and token_dims(a, sym) and token_dims(a, sym) != [0] or b is not None and token_dims(b, sym):
            return f"{name} contracts over tokens"
        return None
    if packet is aten.embedding:
        return None if not token_dims(ins[0], sym) else f"{name} looks up rows of a token-sized table"
    return f"{name} is not known to treat tokens independently"


def _generated_kernel_reason(node: fx.Node, sym) -> Optional[str]:
    """A generated kernel (lowering/) is token-wise when it is element-wise; a row kernel reducing a token dim,
    or an indexed load that reads a token dim anywhere but at the point's own token, mixes tokens."""
    import json

    from ..lowering.cache import kir_for
    from ..lowering.index_expr import Affine

    inputs, shape, key = node.args[0], node.args[1], node.args[2]
    kir = kir_for(key)
    space = [_expr(s.meta.get("val")) if isinstance(s, fx.Node) else s for s in shape]
    space = [None] * (kir.rank - len(space)) + space
    token_space = {d for d, e in enumerate(space) if isinstance(e, sympy.Expr) and sym in e.free_symbols}
    if kir.reduce_dim is not None and kir.reduce_dim in token_space:
        return f"kunlun::pointwise {key} reduces along the token dim {kir.reduce_dim}"
    if 0 in token_space and any(i.op == "store.at" for i in kir.instrs):
        return f"kunlun::pointwise {key} writes values at ids along the token dim"
    if not kir.indexed:
        return None
    own = {f"c{d}" for d in token_space}
    for ins in kir.instrs:
        if ins.op != "load.at":
            continue
        a = json.loads(ins.attr)
        val = inputs[a["in"]].meta.get("val") if isinstance(inputs[a["in"]], fx.Node) else None
        token_in = set(_token_related(val, sym))
        for j, e in enumerate(a["index"]):
            code = Affine.from_json(e).code()
            if j in token_in and code not in own:
                return f"kunlun::pointwise {key} reads token dim {j} of input {a['in']} at {code}"
        for e, _, _ in a["guard"]:
            if any(c in Affine.from_json(e).code() for c in own):
                return f"kunlun::pointwise {key} selects between sources along a token dim"
    return None


def _repeat_reason(name: str, src: Any, repeats: Sequence[Any], sym) -> Optional[str]:
    """`repeat` tiles whole copies: along a token dim the copies of padded rows land among real ones."""
    if not isinstance(src, torch.Tensor):
        return None
    lead = len(repeats) - src.dim()
    for d in _token_related(src, sym):
        if repeats[lead + d] != 1:
            return f"{name} tiles the token dim {d}"
    return None


def _scatter_reason(name: str, node: fx.Node, dest: Any, others: Sequence[Any], sym) -> Optional[str]:
    """A scatter keeps tokens apart only when each token's row is written within that token's own row
    of the destination: the scattered dim is not a token dim, and the index/source token dims are the
    destination's (row i writes row i)."""
    dest_dims = set(_token_related(dest, sym))
    hit = [d for d in _dims_arg(node) if isinstance(dest, torch.Tensor) and d % max(dest.dim(), 1) in dest_dims]
    if hit:
        return f"{name} writes along the token dim {hit[0]}"
    if packet_has_index_list(node):
        return f"{name} writes at token-dependent indices" if any(_token_related(v, sym) for v in others) else None
    for v in others:
        extra = set(_token_related(v, sym)) - dest_dims
        if extra:
            return f"{name} writes token rows at indices into another tensor: padded rows would be written in"
    return None


def packet_has_index_list(node: fx.Node) -> bool:
    return _packet(node.target) in (aten.index_put, aten._index_put_impl)


def why_not_token_wise(gm: fx.GraphModule, sym: Optional[sympy.Symbol]) -> Optional[str]:
    """None when every node of `gm` keeps tokens independent (padding is safe), else the first reason."""
    if sym is None:
        return "the graph has no symbolic token dimension"
    for node in gm.graph.nodes:
        reason = _node_reason(node, sym)
        if reason:
            return reason
    return None


class SymbolBinder:
    """Symbol -> runtime int, from graph inputs: which (input, dim) carries each symbol is worked out
    once from the meta values, so a call reads a few sizes instead of walking every input's shape
    (a model's graph has dozens of parameter inputs, all static)."""

    def __init__(self, vals: Sequence[Any]):
        self.dims: List[tuple] = []  # (input index, dim or None for a SymInt input, symbol)
        seen = set()
        for i, val in enumerate(vals):
            if isinstance(val, torch.Tensor):
                sizes = [(d, _expr(s)) for d, s in enumerate(val.shape)]
            elif isinstance(val, torch.SymInt):
                sizes = [(None, _expr(val))]
            else:
                continue
            for d, e in sizes:
                if isinstance(e, sympy.Symbol) and e not in seen:
                    seen.add(e)
                    self.dims.append((i, d, e))

    def __call__(self, values: Sequence[Any]) -> Dict[sympy.Symbol, int]:
        return {sym: int(values[i] if d is None else values[i].shape[d]) for i, d, sym in self.dims}


def evaluate(val: Any, bindings: Dict[sympy.Symbol, int]) -> Optional[int]:
    """The int a SymInt meta value takes under `bindings` (None if it is not a SymInt)."""
    if not isinstance(val, torch.SymInt):
        return None
    return int(_expr(val).xreplace(bindings))
