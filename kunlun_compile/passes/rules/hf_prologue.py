"""norm_rope_gate, HF transformers form -> kunlun::qk_norm_rope.

HF's Llama/Qwen3 attention projects q, k, v separately, views them per head,
(Qwen3) RMS-normalises q and k per head, transposes to [B, H, S, D] and applies
`apply_rotary_pos_emb` with `rotate_half` and cos/sin tables the rotary module
computed once per forward from `inv_freq` and the position ids.  The q/k work
from the per-head views to the rotated tensors is one kernel; the cos/sin tables
are computed once per model call and stay as they are.
"""
from __future__ import annotations

import torch

from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g
from .norms import EPS, gemma_lone, hf_lone
from .prologue import MAX_HEAD_DIM

aten = torch.ops.aten
_B, _S, _NQ, _NKV, _D = 2, 5, 4, 2, 16  # example sizes, all different


# ---- search functions (the model's code) ---------------------------------------------------------

def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_rope(q, k, cos, sin):
    """q/k [B, H, S, D], cos/sin [B, S, D] (HF `apply_rotary_pos_emb`, unsqueeze_dim=1)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def hf_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """Qwen3: q/k per-head views [B, S, H, D] -> q_norm/k_norm -> transpose -> rotary."""
    q = hf_lone(q, q_weight, eps).transpose(1, 2)
    k = hf_lone(k, k_weight, eps).transpose(1, 2)
    return hf_rope(q, k, cos, sin)


def _norm_after_transpose_rope(norm):
    def transposed_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
        q = norm(q.transpose(1, 2), q_weight, eps)
        k = norm(k.transpose(1, 2), k_weight, eps)
        return hf_rope(q, k, cos, sin)
    return transposed_norm_rope


# q/k per-head views transposed first, then the Q/K norms, then rotary (a norm over the last dim commutes with
# the transpose: the op normalises the same rows).  Gemma3: `1 + w` norms in fp32, one rounding; Exaone4 and
# Apertus: Llama-style norms.
hf_gemma_norm_rope = _norm_after_transpose_rope(gemma_lone)
hf_transposed_norm_rope = _norm_after_transpose_rope(hf_lone)


def hf_plain_rope(q, k, cos, sin):
    """Llama: q/k per-head views [B, S, H, D] -> transpose -> rotary."""
    return hf_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def hf_partial_rope(q, k, cos, sin):
    """Phi3 / StableLm: rotary over the first cos.shape[-1] dims of each head, the rest passed through by
    slicing and `cat` (Phi3 slices even when the rotary is full width: the passed part is empty)."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rot = cos.shape[-1]
    q_embed, k_embed = hf_rope(q[..., :rot], k[..., :rot], cos, sin)
    return torch.cat([q_embed, q[..., rot:]], dim=-1), torch.cat([k_embed, k[..., rot:]], dim=-1)


def hf_sliced_full_rope(q, k, cos, sin):
    """Phi3 at full rotary width: the rotated slice spans the head (cleanup folds it away) and the passed
    slice is empty; the `cat` with it stays."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rot = cos.shape[-1]
    q_embed, k_embed = hf_rope(q, k, cos, sin)
    return torch.cat([q_embed, q[..., rot:]], dim=-1), torch.cat([k_embed, k[..., rot:]], dim=-1)


def hf_promoted_rope(q, k, cos, sin):
    """Olmo2 in bf16/fp16: float32 cos/sin (its rotary module does not cast them back), so `q * cos`
    promotes: the rotation runs in float32 and the result is cast back to q's dtype once."""
    q_embed, k_embed = hf_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_embed.to(q.dtype), k_embed.to(k.dtype)


def rotate_halves_without_neg(x, cos, sin):
    """GptOss `_apply_rotary_emb`: neox halves rotated without `rotate_half` (`x1 cos - x2 sin` is
    `x1 cos + (-x2) sin` to the bit), against half-width tables."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def hf_halves_rope(q, k, cos, sin):
    """GptOss: per-head views -> transpose -> the halves rotation; cos/sin [B, S, D/2] (its rotary module
    does not repeat the angles for the second half)."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return rotate_halves_without_neg(q, cos, sin), rotate_halves_without_neg(k, cos, sin)


def rotate_pairs(x):
    """Cohere / Glm `rotate_half`: each pair (x[2i], x[2i+1]) becomes (-x[2i+1], x[2i]) (GPT-J style)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def hf_pairs_rope(q, k, cos, sin):
    """Cohere: per-head views -> transpose -> pair rotation over the whole head; the rotary module already
    interleaved cos/sin per pair (`repeat_interleave(freqs, 2)`)."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_pairs(q) * sin), (k * cos) + (rotate_pairs(k) * sin)


def hf_upcast_pairs_rope(q, k, cos, sin):
    """Cohere in bf16/fp16: q and k transposed, cast to float32, rotated in float32, rounded back once."""
    dtype = q.dtype
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q_embed, k_embed = (q * cos) + (rotate_pairs(q) * sin), (k * cos) + (rotate_pairs(k) * sin)
    return q_embed.to(dtype), k_embed.to(dtype)


def hf_pairs_rope_tables_per_head(q, k, cos, sin):
    """Helium: pair rotation over the whole head, the tables interleaved inside `apply_rotary_pos_emb`
    (an ATen op ahead of the match: cos/sin come in as [B, 1, S, D])."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    return (q * cos) + (rotate_pairs(q) * sin), (k * cos) + (rotate_pairs(k) * sin)


def hf_upcast_pairs_rope_tables_per_head(q, k, cos, sin):
    """Ernie4.5 in bf16/fp16: the pair rotation in q's dtype (exact: a negation and a shuffle), then q and
    the rotated q cast to float32 against float32 [B, 1, S, D] tables, rounded back once."""
    dtype = q.dtype
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q_embed = (q.float() * cos) + (rotate_pairs(q).float() * sin)
    k_embed = (k.float() * cos) + (rotate_pairs(k).float() * sin)
    return q_embed.to(dtype), k_embed.to(dtype)


def hf_pairs_partial_rope(q, k, cos, sin):
    """Glm: pair rotation over the first cos.shape[-1] dims, the rest passed through by `cat`.  Glm
    interleaves its tables inside `apply_rotary_pos_emb` (half of cos, each value twice): that stays an ATen
    op ahead of the match, whose cos/sin inputs are the interleaved [B, 1, S, R] tables."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_embed = (q_rot * cos) + (rotate_pairs(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_pairs(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


# ---- replacements -------------------------------------------------------------------------------------

def _fused(q, k, q_weight, k_weight, cos, sin, eps, norm_offset=0.0, neox=True):
    batch, seq, nq, d = q.shape
    nkv = k.shape[2]
    rot = cos.shape[-1]
    cos = cos.expand(batch, seq, rot).reshape(batch * seq, rot)  # a view unless cos is shared over the batch
    sin = sin.expand(batch, seq, rot).reshape(batch * seq, rot)
    q_out, k_out = torch.ops.kunlun.qk_norm_rope(q.reshape(batch * seq, nq, d), k.reshape(batch * seq, nkv, d),
                                                 q_weight, k_weight, cos, sin, eps, norm_offset, neox)
    return q_out.view(batch, seq, nq, d).transpose(1, 2), k_out.view(batch, seq, nkv, d).transpose(1, 2)


def fused_norm_rope(q, k, q_weight, k_weight, cos, sin, *, eps):
    return _fused(q, k, q_weight, k_weight, cos, sin, eps)


def fused_gemma_norm_rope(q, k, q_weight, k_weight, cos, sin, *, eps):
    return _fused(q, k, q_weight, k_weight, cos, sin, eps, norm_offset=1.0)


def fused_plain_rope(q, k, cos, sin):
    return _fused(q, k, None, None, cos, sin, 1e-6)


def fused_halves_rope(q, k, cos, sin):
    """The op's neox tables are full width: both halves rotate by the same angles."""
    return _fused(q, k, None, None, torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1), 1e-6)


def fused_pairs_rope(q, k, cos, sin):
    return _fused(q, k, None, None, cos, sin, 1e-6, neox=False)


def fused_upcast_pairs_rope(q, k, cos, sin):
    """The op in float32 on the upcast q/k (the model's own arithmetic), rounded back once, as the model."""
    q_out, k_out = _fused(q.float(), k.float(), None, None, cos.float(), sin.float(), 1e-6, neox=False)
    return q_out.to(q.dtype), k_out.to(k.dtype)


def fused_promoted_rope(q, k, cos, sin):
    q_out, k_out = _fused(q.float(), k.float(), None, None, cos.float(), sin.float(), 1e-6)
    return q_out.to(q.dtype), k_out.to(k.dtype)


def fused_upcast_pairs_rope_tables_per_head(q, k, cos, sin):
    return fused_upcast_pairs_rope(q, k, cos.squeeze(1), sin.squeeze(1))


def fused_pairs_partial_rope(q, k, cos, sin):
    return _fused(q, k, None, None, cos.squeeze(1), sin.squeeze(1), 1e-6, neox=False)


# ---- guard ----------------------------------------------------------------------------------------------

def _guard(b: Bindings, norm: bool, partial: bool = False, upcast: bool = False, cos_per_head: bool = False,
           half_tables: bool = False):
    """`upcast`: the rotation runs in float32 (cos/sin may be any float dtype); `cos_per_head`: cos/sin
    come as [B, 1, S, R] (unsqueezed for the heads before the match); `half_tables`: cos/sin are half the
    head wide (one angle per pair of halves)."""
    q, k, cos, sin = b.val("q"), b.val("k"), b.val("cos"), b.val("sin")
    if cos_per_head:
        if cos.dim() != 4 or not g.known_equal(cos.shape[1], 1) or sin.dim() != 4:
            return Refusal(f"cos {tuple(cos.shape)}: need [batch, 1, seq, rotary_dim]")
        cos, sin = cos[:, 0], sin[:, 0]
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return Refusal(f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}: need 4-D per-head "
                       "views [batch, seq, heads, head_dim] and 3-D cos/sin")
    d = q.shape[3]
    reason = g.first(
        g.float_dtype(q, "q"),
        g.same_dtype(q, k, "q and k"),
        g.float_dtype(cos, "cos") if upcast else g.same_dtype(q, cos, "q and cos"),
        g.same_dtype(cos, sin, "cos and sin"),
        None if g.same_shape(cos, sin) else f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ",
        None if all(g.known_equal(x, y) for x, y in zip(q.shape[:2], k.shape[:2])) and g.known_equal(k.shape[3], d)
        else f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, sequence or head_dim",
        None if g.known_equal(cos.shape[1], q.shape[1]) and (g.known_equal(cos.shape[0], q.shape[0])
                                                             or g.known_equal(cos.shape[0], 1))
        else f"cos {tuple(cos.shape)} is not per token of q {tuple(q.shape)}",
        (None if isinstance(cos.shape[2], int) and cos.shape[2] % 2 == 0 and cos.shape[2] <= d
         else f"rotary width {cos.shape[2]} is not even and at most head_dim {d}") if partial
        else None if g.known_equal(cos.shape[2] * (2 if half_tables else 1), d)
        else f"cos width {cos.shape[2]} is not {'half of ' if half_tables else ''}head_dim {d}",
        None if isinstance(d, int) and d % 8 == 0 and d <= MAX_HEAD_DIM
        else f"head_dim {d} is not supported by the kernel (a multiple of 8, at most {MAX_HEAD_DIM})",
    )
    if not reason and norm:
        qw, kw = b.val("q_weight"), b.val("k_weight")
        reason = g.first(g.positive_eps(b.scalar("eps")), g.vector_of(qw, d, "q_weight"),
                         g.vector_of(kw, d, "k_weight"), g.same_dtype(q, qw, "q and q_weight"),
                         g.same_dtype(q, kw, "q and k_weight"))
    return Refusal(reason) if reason else {}


def _example_inputs(dtype, norm: bool, rot: int = _D, per_head: bool = False, table_dtype=None):
    q = torch.randn(_B, _S, _NQ, _D, dtype=dtype)
    k = torch.randn(_B, _S, _NKV, _D, dtype=dtype)
    table = (_B, 1, _S, rot) if per_head else (_B, _S, rot)
    cos, sin = (torch.randn(*table, dtype=table_dtype or dtype) for _ in range(2))
    if not norm:
        return q, k, cos, sin
    return q, k, torch.randn(_D, dtype=dtype), torch.randn(_D, dtype=dtype), cos, sin


def _rule(norm: bool) -> Rewrite:
    return Rewrite(family="norm_rope_gate", name="hf_qknorm_rope" if norm else "hf_rope",
                   search=hf_norm_rope if norm else hf_plain_rope,
                   replace=fused_norm_rope if norm else fused_plain_rope,
                   example_inputs=lambda dtype: _example_inputs(dtype, norm),
                   constants={"eps": EPS} if norm else {},
                   guard=lambda b: _guard(b, norm),
                   needs=(aten.cat.default, aten.neg.default, aten.transpose.int))


_SLICED = dict(family="norm_rope_gate", replace=fused_plain_rope,
               needs=(aten.cat.default, aten.neg.default, aten.transpose.int, aten.slice.Tensor))
_PARTIAL = [
    Rewrite(name="hf_partial_rope", search=hf_partial_rope, guard=lambda b: _guard(b, False, partial=True),
            example_inputs=lambda dtype: _example_inputs(dtype, False, rot=_D // 2), **_SLICED),
    Rewrite(name="hf_sliced_full_rope", search=hf_sliced_full_rope, guard=lambda b: _guard(b, False),
            example_inputs=lambda dtype: _example_inputs(dtype, False), **_SLICED),
]

# Olmo2: neox halves with float32 tables in a bf16/fp16 model (before the plain rule, which the guard would
# refuse on the mixed dtypes)
_PROMOTED = Rewrite(family="norm_rope_gate", name="hf_promoted_rope", search=hf_promoted_rope,
                    replace=fused_promoted_rope, guard=lambda b: _guard(b, False, upcast=True),
                    example_inputs=lambda dtype: _example_inputs(dtype, False, table_dtype=torch.float32),
                    dtypes=(torch.bfloat16, torch.float16),
                    needs=(aten.cat.default, aten.neg.default, aten.transpose.int))

# Exaone4 / Apertus: Llama-style Q/K norms after the head transpose (with the norms first, as Gemma3's)
_TRANSPOSED_NORM = Rewrite(family="norm_rope_gate", name="hf_transposed_qknorm_rope", search=hf_transposed_norm_rope,
                           replace=fused_norm_rope, example_inputs=lambda dtype: _example_inputs(dtype, True),
                           constants={"eps": EPS}, guard=lambda b: _guard(b, True),
                           needs=(aten.cat.default, aten.neg.default, aten.transpose.int, aten.rsqrt.default))

# GptOss: the halves rotation written without `-x2`, half-width tables
_HALVES = Rewrite(family="norm_rope_gate", name="hf_halves_rope", search=hf_halves_rope, replace=fused_halves_rope,
                  guard=lambda b: _guard(b, False, half_tables=True),
                  example_inputs=lambda dtype: _example_inputs(dtype, False, rot=_D // 2),
                  needs=(aten.cat.default, aten.sub.Tensor, aten.transpose.int))

_PAIRS_NEEDS = (aten.stack.default, aten.neg.default, aten.transpose.int)
_PAIRS = [
    Rewrite(family="norm_rope_gate", name="hf_pairs_partial_rope", search=hf_pairs_partial_rope,
            replace=fused_pairs_partial_rope, guard=lambda b: _guard(b, False, partial=True, cos_per_head=True),
            example_inputs=lambda dtype: _example_inputs(dtype, False, rot=_D // 2, per_head=True),
            needs=_PAIRS_NEEDS + (aten.cat.default,)),
    Rewrite(family="norm_rope_gate", name="hf_pairs_rope_tables_per_head", search=hf_pairs_rope_tables_per_head,
            replace=fused_pairs_partial_rope, guard=lambda b: _guard(b, False, partial=True, cos_per_head=True),
            example_inputs=lambda dtype: _example_inputs(dtype, False, per_head=True), needs=_PAIRS_NEEDS),
    Rewrite(family="norm_rope_gate", name="hf_upcast_pairs_rope_tables_per_head",
            search=hf_upcast_pairs_rope_tables_per_head, replace=fused_upcast_pairs_rope_tables_per_head,
            guard=lambda b: _guard(b, False, partial=True, upcast=True, cos_per_head=True),
            example_inputs=lambda dtype: _example_inputs(dtype, False, per_head=True, table_dtype=torch.float32),
            dtypes=(torch.bfloat16, torch.float16), needs=_PAIRS_NEEDS),
    Rewrite(family="norm_rope_gate", name="hf_upcast_pairs_rope", search=hf_upcast_pairs_rope,
            replace=fused_upcast_pairs_rope, guard=lambda b: _guard(b, False, upcast=True),
            example_inputs=lambda dtype: _example_inputs(dtype, False), dtypes=(torch.bfloat16, torch.float16),
            needs=_PAIRS_NEEDS),
    Rewrite(family="norm_rope_gate", name="hf_pairs_rope", search=hf_pairs_rope, replace=fused_pairs_rope,
            guard=lambda b: _guard(b, False), example_inputs=lambda dtype: _example_inputs(dtype, False),
            needs=_PAIRS_NEEDS),
]

# with the norms first (the plain rule would split them off), the partial form before the plain one (whose
# match inside it would leave the passed-through slice reading an intermediate)
_GEMMA = Rewrite(family="norm_rope_gate", name="hf_gemma_qknorm_rope", search=hf_gemma_norm_rope,
                 replace=fused_gemma_norm_rope, example_inputs=lambda dtype: _example_inputs(dtype, True),
                 constants={"eps": EPS}, guard=lambda b: _guard(b, True),
                 needs=(aten.cat.default, aten.neg.default, aten.transpose.int, aten.rsqrt.default))

RULES = [_rule(True), _GEMMA, _TRANSPOSED_NORM, *_PARTIAL, _PROMOTED, _rule(False), _HALVES, *_PAIRS]
