"""kunlun::fused_moe — routed experts with SwiGLU, from the router's choice to the output.

    out[m] = Σ_j w[m,j] · (w2[e] @ act(w13[e] @ x[m] + b13[e]) + b2[e]),   e = ids[m,j]

w13 is [E, 2I, H], w2 is [E, H, I]; the biases b13 [E, 2I] and b2 [E, H] are optional.  The activation:
- "silu": gate rows, then up rows; act = silu(gate) * up.
- "swigluoai" (gpt-oss; vLLM's name): gate and up rows interleaved (gate 2n, up 2n + 1);
  act = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit).
The kernels read either layout through strides (gate row n at n * step, its up row `up_offset` further).
The execution
path (small / medium / large) comes from `moe_plan.plan_fused_moe`.  The
smallest sizes run GEMVs, one program per (pair, column block), the second
summing each token's pairs (two launches in all).  The other paths share one
grouped-GEMM kernel and differ in how a program finds its rows: scanning the id
table (small) or a block of expert-sorted pairs (medium, large).

Rounding follows the model code it replaces (bf16/fp16): each GEMM result is
rounded to the dtype, and again after its bias, SwiGLU rounds silu and the product
(swigluoai: alpha * g, the sigmoid, the gated value, up + 1 and the product), the routing weight is
cast to the dtype and the weighted product rounded, and the k products of a
token are summed in fp32 and rounded once.

An id outside [0, E) is an error on the CPU; on a GPU (no host read, so the op
stays capturable) the token it belongs to gets NaN, unless KUNLUN_COMPILE_CHECK_INDICES=1
asks for the host check there too (index_checks.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..triton_kernel import kernel, use_triton, wait_for_producers
from .moe_plan import MoePlan, fit_shared_memory, for_interpreter, plan_fused_moe
from .index_checks import check_index_range
from .moe_routing import sort_pairs

ACTIVATIONS = ("silu", "swigluoai")
INTERLEAVED = ("swigluoai",)  # activations whose gate and up rows alternate in w13


def check_args(x, w13, w2, topk_weights, topk_ids, activation: str, b13=None, b2=None, alpha: float = 0.0,
               limit: float = 0.0) -> None:
    name = "fused_moe"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    # no defaults that mean something: a traced call leaves out arguments equal to their defaults, and the
    # rules that match the op need alpha and limit in the graph (passes/rules/moe_experts.py)
    if activation == "swigluoai" and not (limit > 0 and alpha != 0):
        raise ValueError(f"{name}: swigluoai needs alpha != 0 and limit > 0 (gpt-oss: 1.702, 7.0), got "
                         f"{alpha}, {limit}")
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{name}: need x [M, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    M, H = x.shape
    E, two_i, H13 = w13.shape
    if H13 != H or two_i % 2 or tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"{name}: shapes don't add up: x {tuple(x.shape)}, w13 {tuple(w13.shape)} "
                         f"(want [E, 2I, {H}]), w2 {tuple(w2.shape)} (want [{E}, {H}, {two_i // 2}])")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{name}: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{M}, k]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not x.is_floating_point() or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"{name}: x, w13 and w2 must share one float dtype, got {x.dtype}, {w13.dtype}, "
                         f"{w2.dtype}")
    for bias, want, what in ((b13, (E, two_i), "b13"), (b2, (E, H), "b2")):
        if bias is not None and (tuple(bias.shape) != want or bias.dtype != x.dtype):
            raise ValueError(f"{name}: {what} must be {list(want)} {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host check on CPU tensors (no device sync), and on CUDA ones when asked (index_checks.py)."""
    check_index_range("fused_moe", "topk_ids", topk_ids, num_experts)


def act_and_mul(h: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """The activation's meaning on GEMM1's output h [..., 2I], rounding where the model code rounds."""
    if activation in INTERLEAVED:
        gate, up = h[..., ::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def reference(x, w13, w2, topk_weights, topk_ids, activation: str = "silu", b13=None, b2=None,
              alpha: float = 0.0, limit: float = 0.0) -> torch.Tensor:
    """The definition of correct, in plain torch: one pass per expert."""
    M, H = x.shape
    E = w13.shape[0]
    k = topk_ids.shape[1]
    per_pair = x.new_zeros(M, k, H)
    for e in range(E):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        h = F.linear(x[tok], w13[e])
        h = h if b13 is None else h + b13[e]
        y = F.linear(act_and_mul(h, activation, alpha, limit), w2[e])
        y = y if b2 is None else y + b2[e]
        per_pair[tok, slot] = y * topk_weights[tok, slot, None].to(x.dtype)
    return per_pair.sum(dim=1)


@triton.jit
def _rounded(v, out_ty: tl.constexpr):
    """v rounded to the output dtype, kept in fp32: where the model code rounds."""
    return v.to(out_ty).to(tl.float32)


@triton.jit
def _act_mul(g, u, alpha, limit, out_ty: tl.constexpr, OAI: tl.constexpr):
    """The activation on rounded gate and up values (module docstring), rounding as the model code does.
    The clamps are `where`s: a NaN goes through, as torch.clamp lets it."""
    if OAI:
        g = tl.where(g > limit, limit, g)
        u = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
        s = _rounded(1.0 / (1.0 + tl.exp(-_rounded(g * alpha, out_ty))), out_ty)
        return _rounded(u + 1.0, out_ty) * _rounded(g * s, out_ty)
    else:
        return _rounded(g / (1.0 + tl.exp(-g)), out_ty) * u


@triton.jit
def _swizzled_tile(pid, num_blocks, N, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(block, n-block) of tile `pid` on a 1-D grid where GROUP_M neighbouring blocks sweep their
    n-blocks together (their A tiles and the expert's W tiles are reused from L2)."""
    in_group = GROUP_M * tl.cdiv(N, BN)
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(num_blocks - first, GROUP_M)
    return first + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, b_ptr, a_desc, w_desc, e, start, pid_n, slot, pair, row_ok,
              N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, w_up, b_stride_e, b_stride_n,
              b_up, alpha, limit,
              TOP_K: tl.constexpr, A_BY_PAIR: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr,
              BIAS: tl.constexpr, OAI: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr, A_SORTED: tl.constexpr, OUT_SORTED: tl.constexpr,
              EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA_A: tl.constexpr, TMA_W: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One output tile, out[rows, n-block] = A[rows] @ W[e, n-block, :]^T then the epilogue, for the
    rows `pair` (row_ok marks the real ones) at sorted slots `slot` (= start + row in the tile).
    Output column n reads W row n * w_stride_n (with SWIGLU, its up row w_up further) and bias
    n * b_stride_n (up: b_up further)."""
    prow = tl.where(row_ok, pair, 0).to(tl.int64)
    if A_SORTED:
        row = slot.to(tl.int64)
    else:
        row = prow if A_BY_PAIR else prow // TOP_K
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    kc = tl.arange(0, BK)
    a_rows = a_ptr + row[:, None] * a_stride
    w_base = w_ptr + e.to(tl.int64) * w_stride_e + n[None, :].to(tl.int64) * w_stride_n
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + kc) < K
        if TMA_A:
            a = a_desc.load([start, k0])
        elif EVEN_K and EVEN_N:
            a = tl.load(a_rows + (k0 + kc)[None, :])
        else:
            a = tl.load(a_rows + (k0 + kc)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if TMA_W:
            b = w_desc.load([e * w_rows + pid_n * BN, k0]).T
        elif EVEN_K and EVEN_N:
            b = tl.load(w_base + ((k0 + kc) * w_stride_k)[:, None])
        else:
            b = tl.load(w_base + ((k0 + kc) * w_stride_k)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 dot is wrong; the fp32 products of them are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if SWIGLU:
            if TMA_W:
                bu = w_desc.load([e * w_rows + N + pid_n * BN, k0]).T
            elif EVEN_K and EVEN_N:
                bu = tl.load(w_base + w_up + ((k0 + kc) * w_stride_k)[:, None])
            else:
                bu = tl.load(w_base + w_up + ((k0 + kc) * w_stride_k)[:, None],
                             mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                bu = bu.to(tl.float32)
            if IEEE:
                acc_up = tl.dot(a, bu, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, bu, acc_up)
    out_ty = out_ptr.dtype.element_ty
    y = _rounded(acc, out_ty)
    b_row = b_ptr + e.to(tl.int64) * b_stride_e + n.to(tl.int64) * b_stride_n
    if BIAS:
        y = _rounded(y + tl.load(b_row, mask=n_ok, other=0.0).to(tl.float32)[None, :], out_ty)
    if SWIGLU:
        u = _rounded(acc_up, out_ty)
        if BIAS:
            u = _rounded(u + tl.load(b_row + b_up, mask=n_ok, other=0.0).to(tl.float32)[None, :], out_ty)
        y = _act_mul(y, u, alpha, limit, out_ty, OAI)
    if SCALE:
        tw = tl.load(tw_ptr + prow, mask=row_ok, other=0.0).to(out_ty).to(tl.float32)
        y = y * tw[:, None]
    out_row = slot.to(tl.int64) if OUT_SORTED else prow
    tl.store(out_ptr + out_row[:, None] * out_stride + n[None, :], y.to(out_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@kernel
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, tw_ptr, b_ptr, sorted_ptr, unit_expert_ptr, unit_start_ptr,
                     unit_rows_ptr, a_desc, a_tail_desc, w_desc, M, N, K, num_blocks, w_rows, a_stride, w_stride_e,
                     w_stride_n, w_stride_k, out_stride, w_up, b_stride_e, b_stride_n, b_up, alpha, limit,
                     TOP_K: tl.constexpr, SCAN: tl.constexpr, A_BY_PAIR: tl.constexpr, SWIGLU: tl.constexpr,
                     SCALE: tl.constexpr, BIAS: tl.constexpr, OAI: tl.constexpr, IEEE: tl.constexpr,
                     UPCAST: tl.constexpr,
                     A_SORTED: tl.constexpr, OUT_SORTED: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA_A: tl.constexpr, TMA_W: tl.constexpr,
                     BM: tl.constexpr, TM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKK: tl.constexpr,
                     PDL: tl.constexpr):
    """One program per output tile (`_moe_tile`) for one expert's rows.

    SCAN: program (expert, n-block, token chunk) finds its rows in the [M, k] id table.
    else: program (unit, n-block) takes a unit of expert-sorted pairs (`moe_routing.SortedPairs`): BM
    rows from its start slot, or TM (> 0) rows for an expert's tail unit, a second instance of the
    tile code with its own shapes (and, TMA_A, its own descriptor); with GROUP_M > 0 the grid is
    one-dimensional and swizzled (`_swizzled_tile`).
    A rows are tokens (GEMM1: x), pairs (GEMM2: the SwiGLU output), or, A_SORTED, the block's own
    slots (GEMM2 reading an output GEMM1 wrote in sorted order, OUT_SORTED: contiguous tiles).
    SWIGLU: W rows n * w_stride_n and that + w_up are gate and up; the output is the activation of
    the two (OAI: gpt-oss's, else silu(gate) * up).
    BIAS: each GEMM result gets its expert's bias row (b_ptr) before the epilogue.
    SCALE: the output row is multiplied by the pair's routing weight.
    EVEN_K / EVEN_N: K % BK == 0 / N % BN == 0, so the main loop's loads need no masks (a padding
    row reads a valid row — row 0 or its own slot — and its result is never stored).
    TMA_A / TMA_W: A (A_SORTED only: its tiles are contiguous) / W tiles come through tensor
    descriptors (Hopper's TMA) instead of pointer loads; W is viewed as [E * w_rows, K].
    UPCAST (interpreter only): tiles go to fp32 before the dot.
    """
    wait_for_producers(PDL)
    P = M * TOP_K
    r = tl.arange(0, BM)
    if GROUP_M > 0:
        pid0, pid_n = _swizzled_tile(tl.program_id(0), num_blocks, N, BN, GROUP_M)
    else:
        pid0 = tl.program_id(0)
        pid_n = tl.program_id(1)
    if SCAN:
        e = pid0
        start = pid0 * BM
        slot = start + r
        tok = tl.program_id(2) * BM + r
        kk = tl.arange(0, BKK)
        ids = tl.load(ids_ptr + tok[:, None] * TOP_K + kk[None, :],
                      mask=(tok[:, None] < M) & (kk[None, :] < TOP_K), other=-1)
        hit = ids == e
        row_ok = tl.sum(hit.to(tl.int32), axis=1) > 0
        pair = tok * TOP_K + tl.sum(tl.where(hit, kk[None, :], 0), axis=1)
        active = tl.sum(row_ok.to(tl.int32), axis=0) > 0
    else:
        e = tl.load(unit_expert_ptr + pid0)
        start = tl.load(unit_start_ptr + pid0)
        rows = tl.load(unit_rows_ptr + pid0)
        slot = start + r
        # a unit past the end has no valid slots, and a tail's slots end at start + TM
        pair = tl.load(sorted_ptr + slot, mask=(r < rows) & ((r * 0 + e) >= 0), other=P)
        row_ok = pair < P
        active = e >= 0
    if TM > 0:  # (a static branch: with TM = 0 the tail instance is not compiled at all)
        if active & (rows < BM):
            slot_t = start + tl.arange(0, TM)
            pair_t = tl.load(sorted_ptr + slot_t)
            _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, b_ptr, a_tail_desc, w_desc, e, start, pid_n, slot_t, pair_t,
                      pair_t < P, N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, w_up,
                      b_stride_e, b_stride_n, b_up, alpha, limit, TOP_K, A_BY_PAIR, SWIGLU, SCALE, BIAS, OAI, IEEE,
                      UPCAST, A_SORTED, OUT_SORTED, EVEN_K, EVEN_N, TMA_A, TMA_W, TM, BN, BK)
        elif active:
            _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, b_ptr, a_desc, w_desc, e, start, pid_n, slot, pair, row_ok,
                      N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, w_up, b_stride_e,
                      b_stride_n, b_up, alpha, limit, TOP_K, A_BY_PAIR, SWIGLU, SCALE, BIAS, OAI, IEEE, UPCAST,
                      A_SORTED, OUT_SORTED, EVEN_K, EVEN_N, TMA_A, TMA_W, BM, BN, BK)
    elif active:
        _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, b_ptr, a_desc, w_desc, e, start, pid_n, slot, pair, row_ok,
                  N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, w_up, b_stride_e, b_stride_n,
                  b_up, alpha, limit, TOP_K, A_BY_PAIR, SWIGLU, SCALE, BIAS, OAI, IEEE, UPCAST, A_SORTED, OUT_SORTED,
                  EVEN_K, EVEN_N, TMA_A, TMA_W, BM, BN, BK)


@kernel
def _moe_gemv_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, b_ptr, N, K, E, a_stride, w_stride_e, w_stride_n, w_stride_k,
                     out_stride, w_up, b_stride_e, b_stride_n, b_up, alpha, limit,
                     TOP_K: tl.constexpr, SWIGLU: tl.constexpr, BIAS: tl.constexpr, OAI: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """GEMM1 of the per-pair routing (decode sizes): out[pair, n-block] = W[e, n-block, :] @ x[token].

    A tl.dot tile needs >= 16 rows, so at M=1 the scan path runs tiles 1/16 full on few programs;
    here one program per (pair, n-block) reads its expert id from the table, which spreads the k
    chosen experts' weights over k·N/BN programs.  Products are summed in an fp32 [BN, BK] tile and
    reduced once; rows, bias and rounding as `_moe_gemm_kernel`.  A bad id reads expert 0 instead
    (nothing out of bounds); `_moe_gemv_sum_kernel` makes its token NaN.
    """
    wait_for_producers(PDL)
    pair = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    kc = tl.arange(0, BK)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    e = tl.where((e >= 0) & (e < E), e, 0)
    w_rows = w_ptr + e * w_stride_e + n[:, None].to(tl.int64) * w_stride_n
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    acc_up = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + kc) < K
        a = tl.load(a_ptr + (pair // TOP_K) * a_stride + k0 + kc, mask=k_ok, other=0.0).to(tl.float32)
        w_ok = n_ok[:, None] & k_ok[None, :]
        acc += tl.load(w_rows + ((k0 + kc) * w_stride_k)[None, :], mask=w_ok, other=0.0).to(tl.float32) * a[None, :]
        if SWIGLU:
            up = tl.load(w_rows + w_up + ((k0 + kc) * w_stride_k)[None, :], mask=w_ok, other=0.0)
            acc_up += up.to(tl.float32) * a[None, :]
    out_ty = out_ptr.dtype.element_ty
    y = _rounded(tl.sum(acc, axis=1), out_ty)
    b_row = b_ptr + e * b_stride_e + n.to(tl.int64) * b_stride_n
    if BIAS:
        y = _rounded(y + tl.load(b_row, mask=n_ok, other=0.0).to(tl.float32), out_ty)
    if SWIGLU:
        u = _rounded(tl.sum(acc_up, axis=1), out_ty)
        if BIAS:
            u = _rounded(u + tl.load(b_row + b_up, mask=n_ok, other=0.0).to(tl.float32), out_ty)
        y = _act_mul(y, u, alpha, limit, out_ty, OAI)
    tl.store(out_ptr + pair * out_stride + n, y.to(out_ty), mask=n_ok)


@kernel
def _moe_gemv_sum_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, tw_ptr, b_ptr, N, K, E, a_stride, w_stride_e, w_stride_n,
                         w_stride_k, out_stride, b_stride_e, b_stride_n, TOP_K: tl.constexpr, BIAS: tl.constexpr,
                         BKK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """GEMM2 of the per-pair routing: out[token, n-block] = Σ_j tw_j · W[e_j, n-block, :] @ act[pair_j].

    One program holds a [k, BN, BK] tile: all k experts of its token at once (k loads in flight
    rather than k GEMVs in turn), so no per-pair buffer and no separate sum pass.  Each pair's
    product is rounded (with its bias: rounded again), scaled and rounded as the model does, then the k
    are summed in fp32.
    """
    wait_for_producers(PDL)
    m = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < N
    kc = tl.arange(0, BK)
    jj = tl.arange(0, BKK)
    j_ok = jj < TOP_K
    pair = m * TOP_K + jj
    e = tl.load(ids_ptr + pair, mask=j_ok, other=0).to(tl.int64)
    e_ok = (e >= 0) & (e < E)
    bad = tl.sum((j_ok & ~e_ok).to(tl.int32), axis=0)
    w_rows = (w_ptr + tl.where(e_ok, e, 0)[:, None, None] * w_stride_e
              + n[None, :, None].to(tl.int64) * w_stride_n)
    a_rows = a_ptr + pair[:, None] * a_stride
    acc = tl.zeros([BKK, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + kc) < K
        a = tl.load(a_rows + (k0 + kc)[None, :], mask=j_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w_ok = j_ok[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :]
        w = tl.load(w_rows + ((k0 + kc) * w_stride_k)[None, None, :], mask=w_ok, other=0.0)
        acc += w.to(tl.float32) * a[:, None, :]
    out_ty = out_ptr.dtype.element_ty
    y = _rounded(tl.sum(acc, axis=2), out_ty)
    if BIAS:
        bias = tl.load(b_ptr + tl.where(e_ok, e, 0)[:, None] * b_stride_e + n[None, :].to(tl.int64) * b_stride_n,
                       mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        y = _rounded(y + bias.to(tl.float32), out_ty)
    tw = tl.load(tw_ptr + pair, mask=j_ok, other=0.0).to(out_ty).to(tl.float32)
    y = (y * tw[:, None]).to(out_ty).to(tl.float32)
    total = tl.sum(tl.where(j_ok[:, None], y, 0.0), axis=0)
    total = tl.where(bad > 0, float("nan"), total)
    tl.store(out_ptr + m * out_stride + n, total.to(out_ty), mask=n_ok)


@kernel
def _act_mul_kernel(h_ptr, out_ptr, N, step, up, alpha, limit, OAI: tl.constexpr, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    """The activation as its own pass over GEMM1's [rows, 2N] output: gate n at n * step, up `up` further."""
    wait_for_producers(PDL)
    p = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    out_ty = out_ptr.dtype.element_ty
    g = tl.load(h_ptr + p * 2 * N + n * step, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + p * 2 * N + n * step + up, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + p * N + n, _act_mul(g, u, alpha, limit, out_ty, OAI).to(out_ty), mask=ok)


@kernel
def _sum_pairs_kernel(pairs_ptr, ids_ptr, out_ptr, H, E, TOP_K: tl.constexpr, BKK: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = h < H
    kk = tl.arange(0, BKK)
    ids = tl.load(ids_ptr + m * TOP_K + kk, mask=kk < TOP_K, other=0)
    bad = tl.sum(((ids < 0) | (ids >= E)).to(tl.int32), axis=0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(pairs_ptr + (m * TOP_K + j) * H + h, mask=ok, other=0.0).to(tl.float32)
    acc = tl.where(bad > 0, float("nan"), acc)
    tl.store(out_ptr + m * H + h, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclasses.dataclass(frozen=True)
class Activation:
    """The activation and where its rows sit (module docstring)."""
    name: str = "silu"
    alpha: float = 0.0
    limit: float = 0.0

    @property
    def oai(self) -> bool:
        return self.name == "swigluoai"

    @property
    def interleaved(self) -> bool:
        return self.name in INTERLEAVED


def _rows(t: Optional[torch.Tensor], n_out: int, swiglu: bool, interleaved: bool) -> tuple:
    """(step, up offset) in elements for output column n of a GEMM over W's (or a bias's) rows: gate row
    n * step, with SwiGLU fused its up row `up offset` further.  (0, 0) for no tensor."""
    if t is None:
        return 0, 0
    row = t.stride(1)
    if not swiglu:
        return row, 0
    return (2 * row, row) if interleaved else (row, n_out * row)


def _bias_args(bias: Optional[torch.Tensor], fallback: torch.Tensor, n_out: int, swiglu: bool, interleaved: bool):
    """(pointer, stride over experts, row step, up offset) for the kernels; with no bias a pointer never read."""
    step, up = _rows(bias, n_out, swiglu, interleaved)
    return (fallback if bias is None else bias), (0 if bias is None else bias.stride(0)), step, up


def _gemm(a, w, out, topk_ids, topk_weights, routing, plan: MoePlan, M: int, N: int, top_k: int, *,
          a_by_pair: bool, swiglu: bool, scale: bool, a_sorted: bool = False, out_sorted: bool = False,
          tiles: Optional[tuple] = None, bias: Optional[torch.Tensor] = None, act: Activation = Activation()):
    E, K = w.shape[0], w.shape[2]
    w_step, w_up = _rows(w, N, swiglu, act.interleaved)
    b_ptr, b_stride_e, b_step, b_up = _bias_args(bias, w, N, swiglu, act.interleaved)
    block_n, block_k, warps, *stages = tiles or (plan.block_n, plan.block_k, plan.num_warps)
    stages = stages[0] if stages else plan.num_stages
    n_blocks = triton.cdiv(N, block_n)
    tail_m = plan.tail_m if plan.routing != "scan" else 0
    if plan.routing == "scan":
        grid = (E, n_blocks, triton.cdiv(M, plan.block_m))
        sorted_pairs = unit_expert = unit_start = unit_rows = topk_ids
        num_units, group_m = E, 0
    else:
        sorted_pairs, unit_expert, unit_start, unit_rows = routing[:4]
        num_units, group_m = unit_expert.numel(), plan.group_m
        grid = (num_units * n_blocks,) if group_m else (num_units, n_blocks, 1)
    on_cpu = a.device.type == "cpu"
    even_k, even_n = K % block_k == 0, N % block_n == 0
    # descriptors need whole tiles (a W tile past N would read the next expert's rows) and aligned rows; a
    # tile of interleaved gate (or up) rows is not a block of W
    tma = (plan.tma and even_k and even_n and w.is_contiguous() and not (swiglu and act.interleaved)
           and (K * a.element_size()) % 16 == 0
           and w.data_ptr() % 16 == 0 and a.data_ptr() % 16 == 0)
    a_desc = a_tail_desc = w_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc = TensorDescriptor.from_tensor(w.view(E * w.shape[1], K), [block_n, block_k])
        if a_sorted:
            a_desc = TensorDescriptor.from_tensor(a, [plan.block_m, block_k])
            a_tail_desc = TensorDescriptor.from_tensor(a, [tail_m, block_k]) if tail_m else a_desc
    _moe_gemm_kernel.on(a.device)[grid](
        a, w, out, topk_ids, topk_weights, b_ptr, sorted_pairs, unit_expert, unit_start, unit_rows, a_desc,
        a_tail_desc, w_desc, M, N, K, num_units, w.shape[1], a.stride(0), w.stride(0), w_step, w.stride(2),
        out.stride(0), w_up, b_stride_e, b_step, b_up, act.alpha, act.limit,
        TOP_K=top_k, SCAN=plan.routing == "scan", A_BY_PAIR=a_by_pair, SWIGLU=swiglu, SCALE=scale,
        BIAS=bias is not None, OAI=act.oai, IEEE=a.dtype == torch.float32 or on_cpu, UPCAST=on_cpu,
        A_SORTED=a_sorted, OUT_SORTED=out_sorted,
        GROUP_M=group_m, EVEN_K=even_k, EVEN_N=even_n, TMA_A=a_desc is not None, TMA_W=w_desc is not None,
        BM=plan.block_m, TM=tail_m, BN=block_n, BK=block_k, BKK=triton.next_power_of_2(top_k),
        num_warps=warps, num_stages=stages)


def _act_pass(h: torch.Tensor, out: torch.Tensor, act: Activation) -> None:
    """The activation as a pass of its own over GEMM1's [rows, 2I] output (SwiGLU not fused into GEMM1)."""
    I = out.shape[1]
    step, up = _rows(h, I, True, act.interleaved)
    _act_mul_kernel.on(h.device)[(out.shape[0], triton.cdiv(I, 1024))](
        h, out, I, step, up, act.alpha, act.limit, OAI=act.oai, BLOCK=1024)


def _per_pair_impl(x, w13, w2, tw, ids, plan: MoePlan, out, b13=None, b2=None, act: Activation = Activation()):
    """Two GEMV launches (three with SwiGLU unfused): GEMM1 per pair, GEMM2 per token summing its pairs."""
    M, H = x.shape
    E, I = w2.shape[0], w2.shape[2]
    top_k = ids.shape[1]
    P = M * top_k
    a = x.new_empty(P, I)
    fused = plan.swiglu_fused
    n1 = I if fused else 2 * I
    h = a if fused else x.new_empty(P, n1)
    w_step, w_up = _rows(w13, n1, fused, act.interleaved)
    b_ptr, b_stride_e, b_step, b_up = _bias_args(b13, w13, n1, fused, act.interleaved)
    _moe_gemv_kernel.on(x.device)[(P, triton.cdiv(n1, plan.block_n))](
        x, w13, h, ids, b_ptr, n1, H, E, x.stride(0), w13.stride(0), w_step, w13.stride(2), h.stride(0),
        w_up, b_stride_e, b_step, b_up, act.alpha, act.limit,
        TOP_K=top_k, SWIGLU=fused, BIAS=b13 is not None, OAI=act.oai, BN=plan.block_n, BK=plan.block_k,
        num_warps=plan.num_warps)
    if not fused:
        _act_pass(h, a, act)
    bn, bk, warps = plan.gemm2_tiles()
    b2_ptr, b2_stride_e, b2_step, _ = _bias_args(b2, w2, H, False, False)
    _moe_gemv_sum_kernel.on(x.device)[(M, triton.cdiv(H, bn))](
        a, w2, out, ids, tw, b2_ptr, H, I, E, a.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        b2_stride_e, b2_step, TOP_K=top_k, BIAS=b2 is not None, BKK=triton.next_power_of_2(top_k), BN=bn, BK=bk,
        num_warps=warps)
    return out


def triton_impl(x, w13, w2, topk_weights, topk_ids, activation: str = "silu", plan: Optional[MoePlan] = None,
                b13=None, b2=None, alpha: float = 0.0, limit: float = 0.0):
    M, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    top_k = topk_ids.shape[1]
    if plan is None:
        plan = plan_fused_moe(M, top_k, E)
        plan = for_interpreter(plan) if x.device.type == "cpu" else plan
    plan = fit_shared_memory(plan, x.element_size())
    out = x.new_empty(M, H)
    if M == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    # weights are read through their strides: an [E, K, N] tensor transposed (`torch._grouped_mm`'s layout)
    # is used in place, not copied every call
    ids = topk_ids.contiguous()
    tw = topk_weights.contiguous()
    P = M * top_k
    act = Activation(activation, alpha, limit)
    if plan.routing == "per-pair":
        return _per_pair_impl(x, w13, w2, tw, ids, plan, out, b13, b2, act)
    routing = None if plan.routing == "scan" else sort_pairs(ids, E, plan.block_m, plan.routing, plan.tail_m)
    # sorted_act: GEMM1 writes the SwiGLU output at each pair's sorted slot, so GEMM2 reads contiguous tiles
    sorted_act = plan.sorted_act and routing is not None
    # padding slots of a sorted output are never written: zeros on the CPU keep the interpreter's numpy
    # from warning about the garbage rows it computes on and then drops
    scratch = x.new_zeros if sorted_act and x.device.type == "cpu" else x.new_empty
    a = scratch(routing.pairs.numel() if sorted_act else P, I)
    if plan.swiglu_fused:
        _gemm(x, w13, a, ids, tw, routing, plan, M, I, top_k, a_by_pair=False, swiglu=True, scale=False,
              out_sorted=sorted_act, bias=b13, act=act)
    else:
        h = scratch(a.shape[0], two_i)
        _gemm(x, w13, h, ids, tw, routing, plan, M, two_i, top_k, a_by_pair=False, swiglu=False, scale=False,
              out_sorted=sorted_act, bias=b13, act=act)
        _act_pass(h, a, act)
    per_pair = x.new_empty(P, H)
    _gemm(a, w2, per_pair, ids, tw, routing, plan, M, H, top_k, a_by_pair=True, swiglu=False, scale=True,
          a_sorted=sorted_act, tiles=plan.gemm2 or None, bias=b2)
    _sum_pairs_kernel.on(x.device)[(M, triton.cdiv(H, 1024))](
        per_pair, ids, out, H, E, TOP_K=top_k, BKK=triton.next_power_of_2(top_k), BLOCK=1024)
    return out


@torch.library.custom_op("kunlun::fused_moe", mutates_args=())
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str, b13: Optional[torch.Tensor] = None,
              b2: Optional[torch.Tensor] = None, alpha: float = 0.0, limit: float = 0.0) -> torch.Tensor:
    check_args(x, w13, w2, topk_weights, topk_ids, activation, b13, b2, alpha, limit)
    check_ids_in_range(topk_ids, w13.shape[0])
    if use_triton(x):
        return triton_impl(x, w13, w2, topk_weights, topk_ids, activation, None, b13, b2, alpha, limit)
    return reference(x, w13, w2, topk_weights, topk_ids, activation, b13, b2, alpha, limit)


@fused_moe.register_fake
def _(x, w13, w2, topk_weights, topk_ids, activation, b13=None, b2=None, alpha=0.0, limit=0.0):
    check_args(x, w13, w2, topk_weights, topk_ids, activation, b13, b2, alpha, limit)
    return x.new_empty(x.shape)
