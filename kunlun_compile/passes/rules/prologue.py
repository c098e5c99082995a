"""norm_rope_gate: the attention prologue -> kunlun::split_norm_rope_gate.  Stage two: chains of primitives.

The search function is the prologue of a vLLM attention layer as the model code writes it: split the fused
qkv(+gate) projection, optional per-head Q/K RMSNorm (vLLM or Gemma style), and the rotation against
`cos_sin_cache[positions]`.  By the time these rules run, each Q/K norm is one `kunlun::rmsnorm_primitive`
node (`norms.py`, any spelling, its rounding in its arguments) and the rotation -- neox halves or GPT-J pairs,
over the whole head or its first `rotary_dim` dims -- one `kunlun::rotary` node (`rotary.py`) whose tables
are the cache's halves widened to the rotated width; so a rule is only (gated or not) x (normed or not) x
(how the halves were widened), and head counts, sizes and the norms' kind are read back from the match.
"""
from __future__ import annotations

import itertools

import torch

from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g
from .norms import EPS, FREE as NORM_FREE, RMSNORM
from .rotary import ROTARY, shared_rotation, widened_tables

aten = torch.ops.aten
# The kernel keeps one head per tile row in registers and loads 16-byte vectors: head_dim a multiple of 8, <= 512.
MAX_HEAD_DIM = 512
# example sizes for tracing; all different so no view or slice of them is a no-op by accident
_T, _NQ, _NKV, _D, _P = 5, 4, 2, 16, 32
_FREE = ((ROTARY, 3), (ROTARY, 4)) + NORM_FREE  # neox and rotary_dim, the norms' parameters: read by the guards


def _qk_norm(x, weight):
    return torch.ops.kunlun.rmsnorm_primitive(x, weight, EPS, 0.0, False)


def shared_norm(b: Bindings):
    """(eps, norm_offset, weight_in_float) of the Q and K norm primitives in a match, else why not.  The prologue
    kernels round as each of the norms' kinds does: vLLM's (cast, then the weight in the dtype), Gemma's (`1 + w`
    in fp32, one rounding) and torch's RMSNorm (`(w * x).to(dtype)`: the weight in fp32, one rounding)."""
    found = {tuple(n.args[2:5]) for n in b.nodes(RMSNORM)}
    if len(found) != 1:
        return f"q and k are normed differently: {sorted(found)}"
    eps, offset, weight_in_float = found.pop()
    return eps, offset, weight_in_float or offset != 0.0


def _rope(positions, q, k, cache, head_dim: int, neox: bool):
    """vLLM's rotary from the cache, its rotation already a primitive.  The result stays per head
    ([tokens, heads, head_dim]): the model's reshape back to its input's shape is left outside the match,
    because a model that feeds the heads straight to attention (vLLM's Qwen3) has that reshape cancelled
    against attention's own view by canonicalisation."""
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cos, sin = cache.index_select(0, positions).chunk(2, dim=-1)
    # vLLM's `apply_rotary_emb` unsqueezes and widens the tables for each rotation; `rotary.share_tables` has
    # made q's and k's read one pair by now
    x_cos, x_sin = widened_tables(cos.unsqueeze(-2), sin.unsqueeze(-2), neox)

    def apply(x):
        return torch.ops.kunlun.rotary(x.view(num_tokens, -1, head_dim), x_cos, x_sin, neox, head_dim)

    return apply(q), apply(k)


def _make_search(gated: bool, normed: bool, neox: bool, nq: int, nkv: int, d: int):
    def prologue(qkv, q_weight, k_weight, cache, positions):
        q_size, kv_size = nq * d, nkv * d
        if gated:
            q_gate, k, v = qkv.split([q_size * 2, kv_size, kv_size], dim=-1)
            lead = q_gate.shape[:-1]
            q, gate = torch.chunk(q_gate.view(*lead, nq, -1), 2, dim=-1)
            q, gate = q.reshape(*lead, -1), gate.reshape(*lead, -1)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if normed:
            q = _qk_norm(q.view(-1, nq, d), q_weight).view(-1, q_size)
            k = _qk_norm(k.view(-1, nkv, d), k_weight).view(-1, kv_size)
        q, k = _rope(positions, q, k, cache, d, neox)
        return (q, k, v, gate) if gated else (q, k, v)

    if normed:
        return prologue

    def prologue_without_norm(qkv, cache, positions):
        return prologue(qkv, None, None, cache, positions)
    return prologue_without_norm


def _replace(*tensors, normed: bool, gated: bool, neox: bool, eps=1e-6, norm_offset=0.0, weight_in_float=False, nq,
             nkv, head_dim, rotary_dim):
    if normed:
        qkv, q_weight, k_weight, cache, positions = tensors
    else:
        (qkv, cache, positions), q_weight, k_weight = tensors, None, None
    q, k, gate = torch.ops.kunlun.split_norm_rope_gate(
        qkv, q_weight, k_weight, cache, positions, nq, nkv, head_dim, rotary_dim, eps, norm_offset, gated, neox,
        weight_in_float)
    kv_size = nkv * head_dim
    v = qkv[:, qkv.shape[1] - kv_size:]
    q, k = q.view(-1, nq, head_dim), k.view(-1, nkv, head_dim)
    return (q, k, v, gate) if gated else (q, k, v)


def _example_inputs(dtype, normed: bool, gated: bool):
    rotary = _D
    cols = (_NQ * (2 if gated else 1) + 2 * _NKV) * _D
    qkv = torch.randn(_T, cols, dtype=dtype)
    cache = torch.randn(_P, rotary, dtype=dtype)
    positions = torch.randint(0, _P, (_T,))
    if not normed:
        return qkv, cache, positions
    return qkv, torch.randn(_D, dtype=dtype), torch.randn(_D, dtype=dtype), cache, positions


def _head_sizes(b: Bindings, gated: bool, rotary_dim: int):
    """(nq, nkv, head_dim) read from the matched split and views, or a reason."""
    split = b.nodes(aten.split_with_sizes.default)
    if len(split) != 1:
        return "the qkv split is not one split_with_sizes"
    sizes = split[0].args[1]
    if len(sizes) != 3 or not all(isinstance(s, int) for s in sizes) or sizes[1] != sizes[2]:
        return f"qkv split sizes {sizes} are not [q, kv, kv] constants"
    views = [n.meta["val"] for n in b.nodes(aten.view.default) if n.meta["val"].dim() == 3]
    last_dims = {int(v.shape[-1]) for v in views if isinstance(v.shape[-1], int)}
    if not last_dims:
        return "no per-head view found"
    # the per-head views are [.., D], the gated q view [.., 2D], GPT-J's re-interleaved part [.., rotary_dim]
    d = max(last_dims) // 2 if gated else max(last_dims)
    if not last_dims <= {d, 2 * d, rotary_dim}:
        return f"per-head views disagree on head_dim: {sorted(last_dims)}"
    q_cols = sizes[0] // 2 if gated else sizes[0]
    if q_cols % d or sizes[1] % d:
        return f"qkv split sizes {sizes} are not whole heads of {d}"
    return q_cols // d, sizes[1] // d, d


def _guard(b: Bindings, normed: bool, gated: bool, neox: bool):
    qkv, cache, positions = b.val("qkv"), b.val("cache"), b.val("positions")
    rotation = shared_rotation(b)
    if isinstance(rotation, str) or rotation[0] != neox:
        return Refusal(rotation if isinstance(rotation, str) else f"the rotation is {'pairs' if neox else 'neox'}")
    rotary_dim = rotation[1]
    sizes = _head_sizes(b, gated, rotary_dim)
    if isinstance(sizes, str):
        return Refusal(sizes)
    nq, nkv, d = sizes
    reason = g.first(
        g.float_dtype(qkv, "qkv"),
        None if qkv.dim() == 2 else f"qkv is {qkv.dim()}-D; the op takes [tokens, columns]",
        None if cache.dtype in (qkv.dtype, torch.float32) else f"cos_sin_cache dtype {cache.dtype}",
        None if positions.dim() == 1 and positions.dtype in (torch.int32, torch.int64)
        else f"positions {tuple(positions.shape)} {positions.dtype}: need 1-D int",
        None if d % 8 == 0 and d <= MAX_HEAD_DIM
        else f"head_dim {d} is not supported by the kernel (a multiple of 8, at most {MAX_HEAD_DIM})",
        None if 0 < rotary_dim <= d and rotary_dim % 2 == 0 else f"rotary_dim {rotary_dim} for head_dim {d}",
        None if g.known_equal(cache.shape[1], rotary_dim)
        else f"cos_sin_cache width {cache.shape[1]} is not rotary_dim {rotary_dim}",
    )
    params = {"nq": nq, "nkv": nkv, "head_dim": d, "rotary_dim": rotary_dim}
    if not reason and normed:
        norm = shared_norm(b)
        if isinstance(norm, str):
            return Refusal(norm)
        params["eps"], params["norm_offset"], params["weight_in_float"] = norm
        qw, kw = b.val("q_weight"), b.val("k_weight")
        in_float = params["weight_in_float"]  # the weight is widened to fp32 anyway
        reason = g.first(g.vector_of(qw, d, "q_weight"), g.vector_of(kw, d, "k_weight"),
                         None if in_float else g.same_dtype(qkv, qw, "qkv and q_weight"),
                         None if in_float else g.same_dtype(qkv, kw, "qkv and k_weight"))
    if reason:
        return Refusal(reason)
    return params


def _rule(gated: bool, normed: bool, neox: bool) -> Rewrite:
    name = "_".join([("gated" if gated else "plain"), ("qknorm" if normed else "nonorm"), ("neox" if neox else "gptj")])
    search = _make_search(gated, normed, neox, _NQ, _NKV, _D)

    def replace(*tensors, **params):
        return _replace(*tensors, normed=normed, gated=gated, neox=neox, **params)

    return Rewrite(family="norm_rope_gate", name=name, search=search, replace=replace,
                   example_inputs=lambda dtype: _example_inputs(dtype, normed, gated),
                   guard=lambda b: _guard(b, normed, gated, neox), free_arguments=_FREE,
                   # GPT-J tables are interleaved by a stack, a gate's chunk copied, a norm is a primitive (tested)
                   needs=(ROTARY, aten.split_with_sizes.default, aten.index_select.default) +
                   (() if neox else (aten.stack.default,)) +
                   ((aten.clone.default,) if gated else ()) + ((RMSNORM,) if normed else ()))


# ---- the rotation alone, on q and k from anywhere (a full-width Q/K norm before it: vLLM's Olmoe) -------------

def _rope_anywhere(neox: bool):
    def rope_anywhere(q, k, cache, positions):
        return _rope(positions, q, k, cache, _D, neox)
    return rope_anywhere


def _rope_anywhere_inputs(dtype):
    return (torch.randn(_T, _NQ * _D, dtype=dtype), torch.randn(_T, _NKV * _D, dtype=dtype),
            torch.randn(_P, _D, dtype=dtype), torch.randint(0, _P, (_T,)))


def _rope_anywhere_guard(b: Bindings):
    q, k, cache, positions = b.val("q"), b.val("k"), b.val("cache"), b.val("positions")
    rotation = shared_rotation(b)
    if isinstance(rotation, str):
        return Refusal(rotation)
    neox, rotary_dim = rotation
    views = [n.meta["val"] for n in b.nodes(aten.view.default) if n.meta["val"].dim() == 3]
    heads = {int(v.shape[-1]) for v in views if isinstance(v.shape[-1], int)}
    d = max(heads) if heads else None
    reason = g.first(
        None if d is not None and heads <= {d, rotary_dim} else f"per-head views disagree on head_dim: {heads}",
        g.float_dtype(q, "q"), g.same_dtype(q, k, "q and k"),
        # the op rotates in q's dtype; a float32 cache would promote the model's products
        g.same_dtype(q, cache, "q and cos_sin_cache"),
        None if q.dim() == 2 and k.dim() == 2 else f"q {tuple(q.shape)}, k {tuple(k.shape)}: need [tokens, columns]",
        None if positions.dim() == 1 and positions.dtype in (torch.int32, torch.int64)
        else f"positions {tuple(positions.shape)} {positions.dtype}: need 1-D int",
        None if d is None or (d % 8 == 0 and d <= MAX_HEAD_DIM)
        else f"head_dim {d} is not supported by the kernel (a multiple of 8, at most {MAX_HEAD_DIM})",
        None if g.known_equal(cache.shape[1], rotary_dim)
        else f"cos_sin_cache width {cache.shape[1]} is not rotary_dim {rotary_dim}")
    if reason:
        return Refusal(reason)
    return {"head_dim": d, "rotary_dim": rotary_dim, "neox": neox}


def _rope_anywhere_fused(q, k, cache, positions, *, head_dim, rotary_dim, neox):
    num_tokens = positions.numel()
    cos, sin = cache.index_select(0, positions.flatten()).chunk(2, dim=-1)  # half-width, read in place
    return torch.ops.kunlun.qk_norm_rope(q.view(num_tokens, -1, head_dim), k.view(num_tokens, -1, head_dim),
                                         None, None, cos, sin, 1e-6, 0.0, neox, False, True)


RULES = [_rule(gated, normed, neox) for gated, normed, neox in itertools.product((True, False), (True, False),
                                                                                  (True, False))]
# last: where the qkv split is in the match, the rules above take it (and the norms with it)
RULES += [Rewrite(family="norm_rope_gate", name=f"rope_anywhere_{'neox' if neox else 'gptj'}",
                 search=_rope_anywhere(neox), replace=_rope_anywhere_fused, example_inputs=_rope_anywhere_inputs,
                 guard=_rope_anywhere_guard, free_arguments=_FREE,
                 needs=(ROTARY, aten.index_select.default) + (() if neox else (aten.stack.default,)))
          for neox in (True, False)]
