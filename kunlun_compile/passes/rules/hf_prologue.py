"""norm_rope_gate, HF transformers form -> kunlun::qk_norm_rope.  Stage two: chains of primitives.

HF attention projects q, k, v separately, views them per head, (Qwen3, Gemma3, ...) RMS-normalises q and k
per head before or after the transpose to [B, H, S, D], and rotates them against cos/sin tables the rotary
module computed once per forward.  By the time these rules run, every spelling of the rotation is one
`kunlun::rotary` node (`rotary.py`: rotate_half or pairs, written-out halves, partial widths, upcasts), so
a rule here is only "per-head view -> (norm) -> transpose -> rotary" for q and for k, sharing their tables;
the Q/K norms are `kunlun::rmsnorm_primitive` nodes by then (`norms.py`), their kind read off the match.
The q/k work from the per-head views to the rotated tensors becomes one kernel; the tables stay as they
are.  The result keeps the primitive's dtype (a float32 table or an upcast x rotates in float32); a cast
back that the model wrote follows as it was.
"""
from __future__ import annotations

import torch

from ..cleanup import fold_cast_round_trips
from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g
from .half_tables import read_half_tables
from .norms import FREE as NORM_FREE, RMSNORM
from .prologue import MAX_HEAD_DIM, _qk_norm, shared_norm
from .rotary import ROTARY, shared_rotation

aten = torch.ops.aten
_B, _S, _NQ, _NKV, _D = 2, 5, 4, 2, 16  # example sizes, all different
_FREE = ((ROTARY, 3), (ROTARY, 4)) + NORM_FREE  # neox and rotary_dim, the norms' parameters: read by the guards


# ---- search functions (the model's code, its rotations already primitives) -------------------------------

def _rotated(x, cos, sin):
    return torch.ops.kunlun.rotary(x, cos, sin, True, _D)


def plain_rope(q, k, cos, sin):
    """Llama: per-head views [B, S, H, D] -> transpose -> rotary; cos/sin [B, 1, S, R] (unsqueezed)."""
    return _rotated(q.transpose(1, 2), cos, sin), _rotated(k.transpose(1, 2), cos, sin)


def upcast_rope(q, k, cos, sin):
    """Cohere / Ernie-4.5 in bf16/fp16: the transposed q and k cast to float32, rotated in float32."""
    return _rotated(q.transpose(1, 2).float(), cos, sin), _rotated(k.transpose(1, 2).float(), cos, sin)


def norm_rope(q, k, q_weight, k_weight, cos, sin):
    """Qwen3: q/k per-head views -> q_norm/k_norm -> transpose -> rotary."""
    q = _qk_norm(q, q_weight).transpose(1, 2)
    k = _qk_norm(k, k_weight).transpose(1, 2)
    return _rotated(q, cos, sin), _rotated(k, cos, sin)


def transposed_norm_rope(q, k, q_weight, k_weight, cos, sin):
    """q/k per-head views transposed first, then the Q/K norms, then rotary (a norm over the last dim commutes
    with the transpose: the op normalises the same rows): Gemma3 (`1 + w`), Exaone4, Apertus."""
    q = _qk_norm(q.transpose(1, 2), q_weight)
    k = _qk_norm(k.transpose(1, 2), k_weight)
    return _rotated(q, cos, sin), _rotated(k, cos, sin)


def per_token_norm_rope(q, k, q_weight, k_weight, cos, sin):
    """Decode-style code: q and k per token [tokens, heads, head_dim], normed, rotated against tables
    [tokens, 1, R] -- no sequence dim, no transpose."""
    return _rotated(_qk_norm(q, q_weight), cos, sin), _rotated(_qk_norm(k, k_weight), cos, sin)


def rope_pair(q, k, cos, sin):
    """q's and k's rotations sharing one pair of tables, whatever made q and k: rotated before the head
    transpose ([B, S, H, D], Meta's Llama, Llama4) or after it and sliced (DeepSeek-V2's MLA q_pe / k_pe)."""
    return _rotated(q, cos, sin), _rotated(k, cos, sin)


def upcast_rope_pair(q, k, cos, sin):
    return _rotated(q.float(), cos, sin), _rotated(k.float(), cos, sin)



# ---- replacement ----------------------------------------------------------------------------------------

def _fused(q, k, q_weight, k_weight, cos, sin, *, eps=1e-6, norm_offset=0.0, weight_in_float=False, upcast=False,
           rounded=False, neox, rotary_dim):
    """The op in the rotation's dtype (the promotion of q's and the tables'; float32 for an upcast q).
    `rounded`: an upcast rotation whose every use casts it back to q's dtype -- the op reads q and k in their
    dtype and rounds once (`float_math`); its result widened again is what the model's cast back folds with
    (`fold_cast_round_trips`), so neither cast is left."""
    if rounded:
        dtype = cos.dtype  # the kernel widens q, k and the tables itself
    else:
        dtype = torch.float32 if upcast else torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
        q, k = q.to(dtype), k.to(dtype)
    batch, seq, nq, d = q.shape
    nkv = k.shape[2]
    # [B or 1, 1, S, R] -> [B * S, R]: a view unless the tables are shared over the batch
    cos = cos.to(dtype)[:, 0].expand(batch, seq, rotary_dim).reshape(batch * seq, rotary_dim)
    sin = sin.to(dtype)[:, 0].expand(batch, seq, rotary_dim).reshape(batch * seq, rotary_dim)
    q_out, k_out = torch.ops.kunlun.qk_norm_rope(q.reshape(batch * seq, nq, d), k.reshape(batch * seq, nkv, d),
                                                 q_weight, k_weight, cos, sin, eps, norm_offset, neox, rounded,
                                                 weight_in_float=weight_in_float)
    return q_out.view(batch, seq, nq, d).transpose(1, 2), k_out.view(batch, seq, nkv, d).transpose(1, 2)


def _as_rotated(q_out, k_out, rounded: bool):
    """The rotations' dtype: a `rounded` op's results widened back, last, so that each widening sits right
    before the model's cast back and folds with it."""
    return (q_out.float(), k_out.float()) if rounded else (q_out, k_out)


def fused_per_token_norm_rope(q, k, q_weight, k_weight, cos, sin, *, eps, norm_offset=0.0, weight_in_float=False,
                              neox, rotary_dim):
    return torch.ops.kunlun.qk_norm_rope(q, k, q_weight, k_weight, cos[:, 0], sin[:, 0], eps, norm_offset, neox,
                                         weight_in_float=weight_in_float)


def fused_rope_pair(q, k, cos, sin, *, heads_first: bool, **params):
    """`_fused` takes q and k before the head transpose and tables [B|1, 1, S|1, R]."""
    if heads_first:  # [B, H, S, D]
        q_out, k_out = _fused(q.transpose(1, 2), k.transpose(1, 2), None, None, cos, sin, **params)
        return _as_rotated(q_out, k_out, params.get("rounded", False))
    q_out, k_out = _fused(q, k, None, None, cos.transpose(1, 2), sin.transpose(1, 2), **params)
    return _as_rotated(q_out.transpose(1, 2), k_out.transpose(1, 2), params.get("rounded", False))


def fused_rope(q, k, cos, sin, **params):
    return _as_rotated(*_fused(q, k, None, None, cos, sin, **params), params.get("rounded", False))


def fused_norm_rope(q, k, q_weight, k_weight, cos, sin, **params):
    return _fused(q, k, q_weight, k_weight, cos, sin, **params)


# ---- guard ----------------------------------------------------------------------------------------------

def _rotation_of(b: Bindings, rank: int, layouts: str):
    """(neox, rotary_dim) shared by q's and k's rotations, with q, k and cos of `rank` dims, else why not."""
    q, k, cos = b.val("q"), b.val("k"), b.val("cos")
    rotation = shared_rotation(b)
    if isinstance(rotation, str):
        return rotation
    if q.dim() != rank or k.dim() != rank or cos.dim() != rank or not g.known_equal(cos.shape[1], 1):
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}: need {layouts}"
    return rotation


def _kernel_reasons(b: Bindings, rotary_dim: int, norm: bool, weights_in_q_dtype: bool):
    """What every form checks: dtypes, a head size the kernel takes, tables as wide as the rotation, weights."""
    q, k, cos, sin = b.val("q"), b.val("k"), b.val("cos"), b.val("sin")
    d = q.shape[-1]
    reasons = [
        g.float_dtype(q, "q"), g.same_dtype(q, k, "q and k"), g.same_dtype(cos, sin, "cos and sin"),
        # a norm's output is in q's dtype: the op would normalise in the tables' dtype instead
        g.same_dtype(q, cos, "q and cos") if norm else None,
        None if g.same_shape(cos, sin) else f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ",
        None if isinstance(d, int) and d % 8 == 0 and d <= MAX_HEAD_DIM
        else f"head_dim {d} is not supported by the kernel (a multiple of 8, at most {MAX_HEAD_DIM})",
        None if g.known_equal(cos.shape[-1], rotary_dim)
        else f"cos width {cos.shape[-1]} is not rotary_dim {rotary_dim}"]
    if norm:
        qw, kw = b.val("q_weight"), b.val("k_weight")
        reasons += [g.vector_of(qw, d, "q_weight"), g.vector_of(kw, d, "k_weight")]
        if weights_in_q_dtype:
            reasons += [g.same_dtype(q, qw, "q and q_weight"), g.same_dtype(q, kw, "q and k_weight")]
    return reasons


def _cast_back_only(b: Bindings) -> bool:
    """Every use of each rotation (float32, from an upcast q or k) is a cast back to q's dtype."""
    dtype = b.val("q").dtype
    return all(u.target is aten._to_copy.default and set(u.kwargs) == {"dtype"} and u.kwargs["dtype"] == dtype
               for n in b.nodes(ROTARY) for u in n.users)


def _upcast_params(b: Bindings) -> dict:
    cos = b.val("cos")
    # the kernel's float math is float32: a float64 table would have made eager's rotation float64
    return {"upcast": True, "rounded": cos.dtype != torch.float64 and _cast_back_only(b)}


def _norm_params(b: Bindings):
    """eps, norm_offset and weight_in_float of the match's Q/K norm primitives, or why the kernel cannot take them."""
    norm = shared_norm(b)
    return norm if isinstance(norm, str) else dict(zip(("eps", "norm_offset", "weight_in_float"), norm))


def _guard(b: Bindings, norm: bool, upcast: bool = False):
    rotation = _rotation_of(b, 4, "4-D per-head views [batch, seq, heads, head_dim] and cos/sin "
                                  "[batch, 1, seq, rotary_dim]")
    if isinstance(rotation, str):
        return Refusal(rotation)
    neox, rotary_dim = rotation
    params = {"neox": neox, "rotary_dim": rotary_dim}
    if norm:
        found = _norm_params(b)
        if isinstance(found, str):
            return Refusal(found)
        params.update(found)
    q, k, cos = b.val("q"), b.val("k"), b.val("cos")
    reason = g.first(
        None if all(g.known_equal(x, y) for x, y in zip(q.shape[:2], k.shape[:2]))
        and g.known_equal(k.shape[3], q.shape[3])
        else f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, sequence or head_dim",
        None if g.known_equal(cos.shape[2], q.shape[1]) and (g.known_equal(cos.shape[0], q.shape[0])
                                                             or g.known_equal(cos.shape[0], 1))
        else f"cos {tuple(cos.shape)} is not per token of q {tuple(q.shape)}",
        *_kernel_reasons(b, rotary_dim, norm, weights_in_q_dtype=not params.get("weight_in_float")))
    if reason:
        return Refusal(reason)
    if upcast:
        params.update(_upcast_params(b))
    return params


def _per_token_guard(b: Bindings):
    rotation = _rotation_of(b, 3, "per-token heads [tokens, heads, head_dim] and cos/sin [tokens, 1, rotary_dim]")
    if isinstance(rotation, str):
        return Refusal(rotation)
    neox, rotary_dim = rotation
    params = _norm_params(b)
    if isinstance(params, str):
        return Refusal(params)
    params.update(neox=neox, rotary_dim=rotary_dim)
    q, k, cos = b.val("q"), b.val("k"), b.val("cos")
    reason = g.first(
        None if g.known_equal(q.shape[0], k.shape[0]) and g.known_equal(k.shape[2], q.shape[2])
        and g.known_equal(cos.shape[0], q.shape[0])
        else f"q {tuple(q.shape)}, k {tuple(k.shape)} and cos {tuple(cos.shape)} differ in tokens or head_dim",
        # the norm's output is in q's dtype, and so is the rotation; a weight multiplied in fp32 is widened anyway
        *_kernel_reasons(b, rotary_dim, norm=True, weights_in_q_dtype=not params["weight_in_float"]))
    if reason:
        return Refusal(reason)
    return params


def _pair_guard(b: Bindings, upcast: bool):
    q, k, cos = b.val("q"), b.val("k"), b.val("cos")
    rotation = shared_rotation(b)
    if isinstance(rotation, str):
        return Refusal(rotation)
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 4:
        return Refusal(f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}: need 4-D q, k and tables")
    neox, rotary_dim = rotation

    def along(dim):
        return g.known_equal(cos.shape[dim], q.shape[dim]) or g.known_equal(cos.shape[dim], 1)

    def fits(heads_dim, tokens_dim):  # tables broadcast over the heads' dim and run along the tokens'
        return g.known_equal(cos.shape[heads_dim], 1) and along(tokens_dim) and along(0)
    # [B, H, S, D] with tables [B|1, 1, S|1, R] (heads first), or [B, S, H, D] with [B|1, S|1, 1, R]
    orientations = [heads_first for heads_first, dims in ((True, (1, 2)), (False, (2, 1))) if fits(*dims)]
    if not orientations:
        return Refusal(f"cos {tuple(cos.shape)} runs along neither q {tuple(q.shape)}'s dim 2 (heads first) nor "
                       "its dim 1 (tokens first)")
    # one token (a decode step with static sizes): the tables fit both ways; the tokens' dim is the one where q
    # and k agree (their heads differ under GQA), and where both agree either reading rotates alike
    agree = [h for h in orientations if g.known_equal(q.shape[2 if h else 1], k.shape[2 if h else 1])]
    heads_first = (agree or orientations)[0]
    tokens = 2 if heads_first else 1
    reason = g.first(
        None if g.known_equal(q.shape[0], k.shape[0]) and g.known_equal(q.shape[tokens], k.shape[tokens])
        and g.known_equal(q.shape[3], k.shape[3])
        else f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, tokens or head_dim",
        *_kernel_reasons(b, rotary_dim, norm=False, weights_in_q_dtype=False))
    if reason:
        return Refusal(reason)
    params = {"neox": neox, "rotary_dim": rotary_dim, "heads_first": heads_first}
    if upcast:
        params.update(_upcast_params(b))
    return params


def _pair_inputs(dtype):
    q, k = torch.randn(_B, _NQ, _S, _D, dtype=dtype), torch.randn(_B, _NKV, _S, _D, dtype=dtype)
    cos, sin = (torch.randn(_B, 1, _S, _D, dtype=dtype) for _ in range(2))
    return q, k, cos, sin


def _pair_rule(name, search, upcast: bool) -> Rewrite:
    return Rewrite(family="norm_rope_gate", name=name, search=search, replace=fused_rope_pair,
                   example_inputs=_pair_inputs,
                   guard=lambda b: _pair_guard(b, upcast), free_arguments=_FREE,
                   dtypes=(torch.bfloat16, torch.float16) if upcast else (torch.float32, torch.bfloat16, torch.float16),
                   needs=(ROTARY,))


def _per_token_inputs(dtype):
    q, k = torch.randn(_S, _NQ, _D, dtype=dtype), torch.randn(_S, _NKV, _D, dtype=dtype)
    cos, sin = (torch.randn(_S, 1, _D, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(_D, dtype=dtype), torch.randn(_D, dtype=dtype), cos, sin


def _per_token_rule(name, search) -> Rewrite:
    return Rewrite(family="norm_rope_gate", name=name, search=search, replace=fused_per_token_norm_rope,
                   example_inputs=_per_token_inputs, guard=_per_token_guard, free_arguments=_FREE,
                   needs=(ROTARY, RMSNORM))


def _example_inputs(dtype, norm: bool):
    q = torch.randn(_B, _S, _NQ, _D, dtype=dtype)
    k = torch.randn(_B, _S, _NKV, _D, dtype=dtype)
    cos, sin = (torch.randn(_B, 1, _S, _D, dtype=dtype) for _ in range(2))
    if not norm:
        return q, k, cos, sin
    return q, k, torch.randn(_D, dtype=dtype), torch.randn(_D, dtype=dtype), cos, sin


def _rule(name, search, norm: bool, upcast: bool = False) -> Rewrite:
    return Rewrite(family="norm_rope_gate", name=name, search=search,
                   replace=fused_norm_rope if norm else fused_rope,
                   example_inputs=lambda dtype: _example_inputs(dtype, norm),
                   guard=lambda b: _guard(b, norm, upcast), free_arguments=_FREE,
                   dtypes=(torch.bfloat16, torch.float16) if upcast else (torch.float32, torch.bfloat16, torch.float16),
                   needs=(ROTARY, aten.transpose.int) + ((RMSNORM,) if norm else ()))


def tidy(gm) -> int:
    """After the rules: the casts a `rounded` op made fold with the model's, the op reads half-width tables."""
    return fold_cast_round_trips(gm) + read_half_tables(gm)


# with the norms first (the plain rule would split them off)
RULES = [
    _rule("hf_qknorm_rope", norm_rope, norm=True),
    _rule("hf_transposed_qknorm_rope", transposed_norm_rope, norm=True),
    _rule("hf_upcast_rope", upcast_rope, norm=False, upcast=True),
    _rule("hf_rope", plain_rope, norm=False),
    _per_token_rule("per_token_qknorm_rope", per_token_norm_rope),
    # last: any two rotations sharing tables, once no rule with a norm or a transpose took them
    _pair_rule("upcast_rope_pair", upcast_rope_pair, upcast=True),
    _pair_rule("rope_pair", rope_pair, upcast=False),
]
