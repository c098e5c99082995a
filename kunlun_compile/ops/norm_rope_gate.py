"""kunlun::split_norm_rope_gate — the attention prologue in one launch.

From the fused qkv(+gate) projection output, per token:
  split q / gate / k (v stays with the caller as its split view),
  per-head RMSNorm of q and k (optional: weights None skip it),
  rotary embedding on the first `rotary_dim` dims of every q and k head
  (neox halves or GPT-J interleaved pairs), from `cos_sin_cache[positions]`,
  and the raw gate copied out contiguous (`sigmoid(gate) * attn` happens after
  attention, so the gate is returned untouched).

Layout of a row of `qkv`: with a gate, the first 2·nq·D columns hold per head
`[q_h | gate_h]`; then nkv·D of k, then nkv·D of v.  Without a gate: q, k, v.

Rounding reproduces the modules being replaced, step by step (bf16/fp16):
- norm_offset == 0 (vLLM RMSNorm): normalise in fp32, cast to the dtype, then
  multiply by the weight in the dtype (one more rounding).
- norm_offset != 0 (Gemma style): `x * rsqrt(..) * (w + offset)` in fp32, cast once; with
  `weight_in_float` the same at offset 0 (torch's `F.rms_norm` / `nn.RMSNorm`: `(w * x).to(dtype)`).
- rotary (vLLM `apply_rotary_emb_torch`): cos/sin cast to the dtype; each of the
  two products and the sum rounded to the dtype.

`positions` may be any 1-D view (the kernel reads it through its stride).  A
position outside the table raises IndexError, as eager does, where the wrapper
checks on the host (index_checks.py); otherwise the kernel reads no table row
for it and that token's q and k come out NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..triton_kernel import kernel, use_triton, wait_for_producers
from .index_checks import check_index_range


def qkv_columns(num_q_heads: int, num_kv_heads: int, head_dim: int, has_gate: bool) -> int:
    return (num_q_heads * (2 if has_gate else 1) + 2 * num_kv_heads) * head_dim


def check_args(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim,
               rotary_dim, eps, has_gate) -> None:
    name = "split_norm_rope_gate"
    if min(num_q_heads, num_kv_heads, head_dim) < 1:
        raise ValueError(f"{name}: head counts and head_dim must be >= 1, got nq={num_q_heads}, "
                         f"nkv={num_kv_heads}, head_dim={head_dim}")
    if rotary_dim < 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"{name}: rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    if qkv.dim() != 2 or not qkv.is_floating_point():
        raise ValueError(f"{name}: qkv must be a 2-D float tensor [T, cols], got {tuple(qkv.shape)} {qkv.dtype}")
    cols = qkv_columns(num_q_heads, num_kv_heads, head_dim, has_gate)
    if qkv.shape[1] != cols:
        raise ValueError(f"{name}: qkv has {qkv.shape[1]} columns; nq={num_q_heads}, nkv={num_kv_heads}, "
                         f"head_dim={head_dim}, has_gate={has_gate} need {cols}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError(f"{name}: give both q_weight and k_weight, or neither")
    for w, label in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        if w is not None and (w.dim() != 1 or w.shape[0] != head_dim):
            raise ValueError(f"{name}: {label} must be [{head_dim}], got {tuple(w.shape)}")
    if q_weight is not None and not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")
    if positions.dim() != 1 or positions.shape[0] != qkv.shape[0] or positions.dtype not in (torch.int32,
                                                                                             torch.int64):
        raise ValueError(f"{name}: positions must be int32/int64 [{qkv.shape[0]}], got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if rotary_dim and (cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != rotary_dim):
        raise ValueError(f"{name}: cos_sin_cache must be [max_positions, rotary_dim={rotary_dim}], got "
                         f"{tuple(cos_sin_cache.shape)}")


def _rms_norm_head(x, w, eps: float, norm_offset: float, weight_in_float: bool = False):
    dtype = x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if norm_offset == 0.0 and not weight_in_float:
        return normed.to(dtype) * w.to(dtype)
    return (normed * (w.float() + norm_offset)).to(dtype)


def _rotate(x, cos, sin, rotary_dim: int, is_neox: bool):
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
    else:
        x1, x2 = rot[..., ::2], rot[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    rotated = torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


def reference(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads: int, num_kv_heads: int,
              head_dim: int, rotary_dim: int, eps: float, norm_offset: float, has_gate: bool,
              is_neox: bool, weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition of correct, in plain torch (the modules' own formulation)."""
    T, nq, nkv, D = qkv.shape[0], num_q_heads, num_kv_heads, head_dim
    q_cols = nq * D * (2 if has_gate else 1)
    q_part, k = qkv[:, :q_cols], qkv[:, q_cols:q_cols + nkv * D]
    if has_gate:
        q, gate = q_part.reshape(T, nq, 2 * D).chunk(2, dim=-1)
        gate = gate.reshape(T, nq * D)
    else:
        q, gate = q_part.reshape(T, nq, D), qkv.new_empty(T, 0)
    k = k.reshape(T, nkv, D)
    if q_weight is not None:
        q = _rms_norm_head(q, q_weight, eps, norm_offset, weight_in_float)
        k = _rms_norm_head(k, k_weight, eps, norm_offset, weight_in_float)
    if rotary_dim:
        cos, sin = cos_sin_cache.index_select(0, positions.long()).chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1).to(qkv.dtype), sin.unsqueeze(1).to(qkv.dtype)
        q, k = _rotate(q, cos, sin, rotary_dim, is_neox), _rotate(k, cos, sin, rotary_dim, is_neox)
    return q.reshape(T, nq * D).contiguous(), k.reshape(T, nkv * D).contiguous(), gate.contiguous()


@kernel
def _norm_rope_kernel(q_in_ptr, k_in_ptr, g_in_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, gate_ptr,
                      T, q_in_stride, k_in_stride, cs_stride, cs_col_stride, cs_rows, pos_stride, eps, norm_offset,
                      NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                      Q_HEAD_STRIDE: tl.constexpr, HAS_GATE: tl.constexpr, IS_NEOX: tl.constexpr,
                      HAS_NORM: tl.constexpr, GEMMA: tl.constexpr, HAS_POSITIONS: tl.constexpr,
                      FULL_WIDTH_COS: tl.constexpr, FLOAT_MATH: tl.constexpr, BT: tl.constexpr,
                      BH: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """One program: BT tokens x BH heads (q heads first, then k heads); each row is one head of one token.

    q heads are read at `q_in + t*q_in_stride + h*Q_HEAD_STRIDE`, k heads at `k_in + t*k_in_stride + kh*D`
    (both views of one fused qkv row, or two separate projections).  cos/sin rows are `positions[t]`
    (HAS_POSITIONS, read `pos_stride` apart) or `t`; a half-width table (vLLM's cache: column c of the
    pair) or a full-width one (HF: cos[d] per column d), its columns `cs_col_stride` apart (the real parts
    of a complex table are 2 apart; 1 is specialised by Triton).  A position outside [0, cs_rows) reads no
    table row: its token's q and k rows come out NaN (the op wrapper can raise instead, see
    index_checks.py).

    Rounding: as the modules do in the input dtype (every product and sum rounded to it), or, FLOAT_MATH,
    in float32 throughout and rounded once on the store (eager's `rotate(x.float()).to(x.dtype)`).

    The gate (a pure copy) is loaded first so its latency overlaps the arithmetic, and q and k rows
    share one store through a selected row pointer: together 79% -> 86% of copy bandwidth at the
    Qwen3-Next shape (benchmarks/NOTES.md v9)."""
    wait_for_producers(PDL)
    r = tl.arange(0, BT * BH)
    t = (tl.program_id(0) * BT + r // BH).to(tl.int64)
    h = tl.program_id(1) * BH + r % BH
    d = tl.arange(0, BD)
    is_q = h < NQ
    kh = h - NQ
    rows = (h < NQ + NKV) & (t < T)
    cols = d < D
    m = rows[:, None] & cols[None, :]
    row_ptr = tl.where(is_q[:, None], q_in_ptr + t[:, None] * q_in_stride + h[:, None] * Q_HEAD_STRIDE,
                       k_in_ptr + t[:, None] * k_in_stride + kh[:, None] * D)
    out_ptr = tl.where(is_q[:, None], q_ptr + t[:, None] * (NQ * D) + h[:, None] * D,
                       k_ptr + t[:, None] * (NKV * D) + kh[:, None] * D)
    if HAS_GATE:  # a pure copy: its load is issued first so it overlaps the arithmetic below
        g_off = t[:, None] * q_in_stride + h[:, None] * Q_HEAD_STRIDE + d[None, :]
        g = tl.load(g_in_ptr + g_off, mask=m & is_q[:, None], other=0.0)
    x = tl.load(row_ptr + d[None, :], mask=m, other=0.0)
    out_ty = x.dtype
    round_ty = tl.float32 if FLOAT_MATH else out_ty  # where the modules round between steps
    x = x.to(tl.float32)
    if HAS_NORM:
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    if ROT > 0:
        if HAS_POSITIONS:
            cs_row = tl.load(pos_ptr + t * pos_stride, mask=t < T, other=0).to(tl.int64)
            pos_ok = (cs_row >= 0) & (cs_row < cs_rows)
        else:
            cs_row = t
            pos_ok = t < T

    # rotary partner of each column (ROT == 0: no rotary, every column passes through)
    half: tl.constexpr = ROT // 2
    in_rot = d < ROT
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        c = tl.where(first, d, d - half)
    else:
        first = (d % 2) == 0
        partner = tl.where(first, d + 1, d - 1)
        c = d // 2
    partner = tl.where(in_rot, partner, d)
    mr = m & in_rot[None, :]
    xp = tl.load(row_ptr + partner[None, :], mask=mr, other=0.0).to(tl.float32)
    if HAS_NORM:
        x = _normed(x, inv, _head_weight(qw_ptr, kw_ptr, is_q, d, cols), norm_offset, round_ty, GEMMA)
        xp = _normed(xp, inv, _head_weight(qw_ptr, kw_ptr, is_q, partner, cols & in_rot), norm_offset, round_ty,
                     GEMMA)
    if ROT > 0:
        cs_col = d if FULL_WIDTH_COS else c
        cs_off = cs_row[:, None] * cs_stride + cs_col[None, :] * cs_col_stride
        mcs = mr & pos_ok[:, None]
        cos = tl.load(cos_ptr + cs_off, mask=mcs, other=0.0).to(round_ty).to(tl.float32)
        sin = tl.load(sin_ptr + cs_off, mask=mcs, other=0.0).to(round_ty).to(tl.float32)
        a = (x * cos).to(round_ty).to(tl.float32)
        b = (xp * sin).to(round_ty).to(tl.float32)
        rotated = tl.where(first[None, :], a - b, a + b)
        x = tl.where(in_rot[None, :], rotated, x)
        x = tl.where(pos_ok[:, None], x, float("nan"))
    tl.store(out_ptr + d[None, :], x.to(out_ty), mask=m)
    if HAS_GATE:
        tl.store(gate_ptr + t[:, None] * (NQ * D) + h[:, None] * D + d[None, :], g, mask=m & is_q[:, None])


# Helpers are plain `triton.jit` functions, like triton's own library (`tl.sum`): interpreted when
# TRITON_INTERPRET=1 was set at import, compiled otherwise.  Calling them rather than writing the weight
# loads inline ahead of the arithmetic is measured: 87% vs 78% of copy bandwidth at the Qwen3-Next
# shape, 1 token x 2 heads (the loads are issued next to their use; benchmarks/NOTES.md v9).
@triton.jit
def _head_weight(qw_ptr, kw_ptr, is_q, cols, ok):
    """[rows, len(cols)]: the q or k norm weight at `cols`, by row."""
    wq = tl.load(qw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    wk = tl.load(kw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return tl.where(is_q[:, None], wq[None, :], wk[None, :])


@triton.jit
def _normed(x, inv, w, norm_offset, out_ty: tl.constexpr, GEMMA: tl.constexpr):
    """RMSNorm of fp32 `x` given its row's 1/rms, rounded as the modules do; returns fp32."""
    if GEMMA:
        return (x * inv[:, None] * (w + norm_offset)).to(out_ty).to(tl.float32)
    # cast, then the weight multiply in the dtype: an exact fp32 product rounded once
    return ((x * inv[:, None]).to(out_ty).to(tl.float32) * w.to(out_ty).to(tl.float32)).to(out_ty).to(tl.float32)


def launch_norm_rope(q_in, k_in, gate_in, q_weight, k_weight, cos, sin, positions, q, k, gate, *,
                     num_tokens, q_head_stride, head_dim, rotary_dim, eps, norm_offset, is_neox,
                     full_width_cos, float_math=False, weight_in_float=False):
    """Launch the kernel.  q_in/k_in/gate_in: 2-D views [T, >= heads*stride] with unit column stride;
    cos/sin: [rows, width] sharing their strides; positions: 1-D, any stride (None: row t of cos/sin);
    q/k/gate: contiguous outputs."""
    nq, nkv, D = q.shape[1] // head_dim, k.shape[1] // head_dim, head_dim
    if not num_tokens:
        return
    has_norm = q_weight is not None
    bt, bh, bd, warps = launch_shape(num_tokens, nq + nkv, D)
    grid = (triton.cdiv(num_tokens, bt), triton.cdiv(nq + nkv, bh))
    _norm_rope_kernel.on(q.device)[grid](
        q_in, k_in, gate_in, q_weight if has_norm else q, k_weight if has_norm else q,
        cos if rotary_dim else q, sin if rotary_dim else q, q if positions is None else positions,
        q, k, gate, num_tokens, q_in.stride(0), k_in.stride(0), cos.stride(0) if rotary_dim else 0,
        cos.stride(1) if rotary_dim else 1, cos.shape[0], 0 if positions is None else positions.stride(0), eps,
        norm_offset,
        NQ=nq, NKV=nkv, D=D, ROT=rotary_dim, Q_HEAD_STRIDE=q_head_stride,
        HAS_GATE=gate.numel() > 0, IS_NEOX=is_neox, HAS_NORM=has_norm, GEMMA=norm_offset != 0.0 or weight_in_float,
        HAS_POSITIONS=positions is not None, FULL_WIDTH_COS=full_width_cos, FLOAT_MATH=float_math, BT=bt, BH=bh,
        BD=bd, num_warps=warps)


# (tokens, heads, warps) per program; None: chosen by launch_shape.  The benchmark sets it to compare tilings.
LAUNCH_OVERRIDE = None


def launch_shape(num_tokens: int, num_heads: int, head_dim: int) -> Tuple[int, int, int, int]:
    """(tokens per program, heads per program, padded head_dim, warps): ~512 values per program,
    spread over heads of one token first where a power of two of them divides the head count (one
    contiguous stretch of the qkv row per program, no rows wasted), else over tokens.  H100 sweep,
    Qwen3-Next T=16384 (benchmarks/NOTES.md v9): 1 token x 2 heads 87% of copy bandwidth,
    2 tokens x 1 head 85.7%, 8 x 1 / 8 warps 80%."""
    block_d = triton.next_power_of_2(head_dim)
    rows = max(1, 512 // block_d)
    block_h = 1
    while block_h * 2 <= rows and num_heads % (block_h * 2) == 0:
        block_h *= 2
    block_t = min(rows // block_h, triton.next_power_of_2(max(num_tokens, 1)))
    warps = 4 if block_t * block_h * block_d >= 1024 else 2
    if LAUNCH_OVERRIDE is not None:
        block_t, block_h, warps = LAUNCH_OVERRIDE
    return block_t, block_h, block_d, warps


def triton_impl(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads: int, num_kv_heads: int,
                head_dim: int, rotary_dim: int, eps: float, norm_offset: float, has_gate: bool, is_neox: bool,
                weight_in_float: bool = False):
    T, nq, nkv, D = qkv.shape[0], num_q_heads, num_kv_heads, head_dim
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    q = qkv.new_empty(T, nq * D)
    k = qkv.new_empty(T, nkv * D)
    gate = qkv.new_empty(T, nq * D if has_gate else 0)
    q_cols = nq * D * (2 if has_gate else 1)
    cache = cos_sin_cache
    if rotary_dim and cache.stride(1) != 1:
        cache = cache.contiguous()
    half = rotary_dim // 2
    launch_norm_rope(qkv, qkv[:, q_cols:], qkv[:, D:] if has_gate else qkv,
                     None if q_weight is None else q_weight.contiguous(),
                     None if k_weight is None else k_weight.contiguous(),
                     cache, cache[:, half:] if rotary_dim else cache, positions, q, k, gate, num_tokens=T,
                     q_head_stride=2 * D if has_gate else D, head_dim=D, rotary_dim=rotary_dim, eps=eps,
                     norm_offset=norm_offset, is_neox=is_neox, full_width_cos=False, weight_in_float=weight_in_float)
    return q, k, gate


@torch.library.custom_op("kunlun::split_norm_rope_gate", mutates_args=())
def split_norm_rope_gate(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                         cos_sin_cache: torch.Tensor, positions: torch.Tensor, num_q_heads: int, num_kv_heads: int,
                         head_dim: int, rotary_dim: int, eps: float, norm_offset: float, has_gate: bool,
                         is_neox: bool,
                         weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim, rotary_dim,
            eps, norm_offset, has_gate, is_neox, weight_in_float)
    check_args(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim,
               rotary_dim, eps, has_gate)
    if rotary_dim:  # positions index the table only with rotary
        check_index_range("split_norm_rope_gate", "positions", positions, cos_sin_cache.shape[0])
    if use_triton(qkv):
        return triton_impl(*args)
    return reference(*args)


@split_norm_rope_gate.register_fake
def _(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim, rotary_dim, eps,
      norm_offset, has_gate, is_neox, weight_in_float=False):
    check_args(qkv, q_weight, k_weight, cos_sin_cache, positions, num_q_heads, num_kv_heads, head_dim,
               rotary_dim, eps, has_gate)
    T = qkv.shape[0]
    return (qkv.new_empty(T, num_q_heads * head_dim), qkv.new_empty(T, num_kv_heads * head_dim),
            qkv.new_empty(T, num_q_heads * head_dim if has_gate else 0))
