"""kunlun::fused_moe — routed experts with SwiGLU, from the router's choice to the output.

    out[m] = Σ_j w[m,j] · w2[e] @ (silu(w13[e,:I] @ x[m]) * (w13[e,I:] @ x[m])),   e = ids[m,j]

w13 is [E, 2I, H] (gate rows, then up rows), w2 is [E, H, I].  The execution
path (small / medium / large) comes from `moe_plan.plan_fused_moe`.  The
smallest sizes run GEMVs, one program per (pair, column block), the second
summing each token's pairs (two launches in all).  The other paths share one
grouped-GEMM kernel and differ in how a program finds its rows: scanning the id
table (small) or a block of expert-sorted pairs (medium, large).

Rounding follows the model code it replaces (bf16/fp16): each GEMM result is
rounded to the dtype, SwiGLU rounds silu and the product, the routing weight is
cast to the dtype and the weighted product rounded, and the k products of a
token are summed in fp32 and rounded once.

An id outside [0, E) is an error on the CPU; on a GPU (no host read, so the op
stays capturable) the token it belongs to gets NaN, unless KUNLUN_COMPILE_CHECK_INDICES=1
asks for the host check there too (index_checks.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..triton_kernel import kernel, use_triton, wait_for_producers
from .moe_plan import MoePlan, fit_shared_memory, for_interpreter, plan_fused_moe
from .index_checks import check_index_range
from .moe_routing import sort_pairs

ACTIVATIONS = ("silu",)


def check_args(x, w13, w2, topk_weights, topk_ids, activation: str) -> None:
    name = "fused_moe"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
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


def check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Host check on CPU tensors (no device sync), and on CUDA ones when asked (index_checks.py)."""
    check_index_range("fused_moe", "topk_ids", topk_ids, num_experts)


def reference(x, w13, w2, topk_weights, topk_ids, activation: str = "silu") -> torch.Tensor:
    """The definition of correct, in plain torch: one pass per expert."""
    M, H = x.shape
    E, two_i, _ = w13.shape
    I = two_i // 2
    k = topk_ids.shape[1]
    per_pair = x.new_zeros(M, k, H)
    for e in range(E):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        h = F.linear(x[tok], w13[e])
        act = F.silu(h[:, :I]) * h[:, I:]
        per_pair[tok, slot] = F.linear(act, w2[e]) * topk_weights[tok, slot, None].to(x.dtype)
    return per_pair.sum(dim=1)


@triton.jit
def _swizzled_tile(pid, num_blocks, N, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(block, n-block) of tile `pid` on a 1-D grid where GROUP_M neighbouring blocks sweep their
    n-blocks together (their A tiles and the expert's W tiles are reused from L2)."""
    in_group = GROUP_M * tl.cdiv(N, BN)
    first = (pid // in_group) * GROUP_M
    size = tl.minimum(num_blocks - first, GROUP_M)
    return first + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, a_desc, w_desc, e, start, pid_n, slot, pair, row_ok,
              N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride,
              TOP_K: tl.constexpr, A_BY_PAIR: tl.constexpr, SWIGLU: tl.constexpr, SCALE: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr, A_SORTED: tl.constexpr, OUT_SORTED: tl.constexpr,
              EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, TMA_A: tl.constexpr, TMA_W: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One output tile, out[rows, n-block] = A[rows] @ W[e, n-block, :]^T then the epilogue, for the
    rows `pair` (row_ok marks the real ones) at sorted slots `slot` (= start + row in the tile)."""
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
                bu = tl.load(w_base + N * w_stride_n + ((k0 + kc) * w_stride_k)[:, None])
            else:
                bu = tl.load(w_base + N * w_stride_n + ((k0 + kc) * w_stride_k)[:, None],
                             mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                bu = bu.to(tl.float32)
            if IEEE:
                acc_up = tl.dot(a, bu, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, bu, acc_up)
    out_ty = out_ptr.dtype.element_ty
    y = acc.to(out_ty).to(tl.float32)
    if SWIGLU:
        silu = (y / (1.0 + tl.exp(-y))).to(out_ty).to(tl.float32)
        y = silu * acc_up.to(out_ty).to(tl.float32)
    if SCALE:
        tw = tl.load(tw_ptr + prow, mask=row_ok, other=0.0).to(out_ty).to(tl.float32)
        y = y * tw[:, None]
    out_row = slot.to(tl.int64) if OUT_SORTED else prow
    tl.store(out_ptr + out_row[:, None] * out_stride + n[None, :], y.to(out_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@kernel
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, tw_ptr, sorted_ptr, unit_expert_ptr, unit_start_ptr,
                     unit_rows_ptr, a_desc, a_tail_desc, w_desc, M, N, K, num_blocks, w_rows, a_stride, w_stride_e,
                     w_stride_n, w_stride_k, out_stride,
                     TOP_K: tl.constexpr, SCAN: tl.constexpr, A_BY_PAIR: tl.constexpr, SWIGLU: tl.constexpr,
                     SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
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
    SWIGLU: W rows n and n + N are gate and up; the output is silu(gate) * up.
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
            _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, a_tail_desc, w_desc, e, start, pid_n, slot_t, pair_t,
                      pair_t < P, N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, TOP_K,
                      A_BY_PAIR, SWIGLU, SCALE, IEEE, UPCAST, A_SORTED, OUT_SORTED, EVEN_K, EVEN_N, TMA_A, TMA_W, TM,
                      BN, BK)
        elif active:
            _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, a_desc, w_desc, e, start, pid_n, slot, pair, row_ok,
                      N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, TOP_K, A_BY_PAIR,
                      SWIGLU, SCALE, IEEE, UPCAST, A_SORTED, OUT_SORTED, EVEN_K, EVEN_N, TMA_A, TMA_W, BM, BN, BK)
    elif active:
        _moe_tile(a_ptr, w_ptr, out_ptr, tw_ptr, a_desc, w_desc, e, start, pid_n, slot, pair, row_ok,
                  N, K, w_rows, a_stride, w_stride_e, w_stride_n, w_stride_k, out_stride, TOP_K, A_BY_PAIR, SWIGLU,
                  SCALE, IEEE, UPCAST, A_SORTED, OUT_SORTED, EVEN_K, EVEN_N, TMA_A, TMA_W, BM, BN, BK)


@kernel
def _moe_gemv_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, N, K, E, a_stride, w_stride_e, w_stride_n, w_stride_k,
                     out_stride,
                     TOP_K: tl.constexpr, SWIGLU: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """GEMM1 of the per-pair routing (decode sizes): out[pair, n-block] = W[e, n-block, :] @ x[token].

    A tl.dot tile needs >= 16 rows, so at M=1 the scan path runs tiles 1/16 full on few programs;
    here one program per (pair, n-block) reads its expert id from the table, which spreads the k
    chosen experts' weights over k·N/BN programs.  Products are summed in an fp32 [BN, BK] tile and
    reduced once; rounding as `_moe_gemm_kernel`.  A bad id reads expert 0 instead (nothing out of
    bounds); `_moe_gemv_sum_kernel` makes its token NaN.
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
            up = tl.load(w_rows + N * w_stride_n + ((k0 + kc) * w_stride_k)[None, :], mask=w_ok, other=0.0)
            acc_up += up.to(tl.float32) * a[None, :]
    out_ty = out_ptr.dtype.element_ty
    y = tl.sum(acc, axis=1).to(out_ty).to(tl.float32)
    if SWIGLU:
        silu = (y / (1.0 + tl.exp(-y))).to(out_ty).to(tl.float32)
        y = silu * tl.sum(acc_up, axis=1).to(out_ty).to(tl.float32)
    tl.store(out_ptr + pair * out_stride + n, y.to(out_ty), mask=n_ok)


@kernel
def _moe_gemv_sum_kernel(a_ptr, w_ptr, out_ptr, ids_ptr, tw_ptr, N, K, E, a_stride, w_stride_e, w_stride_n,
                         w_stride_k, out_stride, TOP_K: tl.constexpr, BKK: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, PDL: tl.constexpr):
    """GEMM2 of the per-pair routing: out[token, n-block] = Σ_j tw_j · W[e_j, n-block, :] @ act[pair_j].

    One program holds a [k, BN, BK] tile: all k experts of its token at once (k loads in flight
    rather than k GEMVs in turn), so no per-pair buffer and no separate sum pass.  Each pair's
    product is rounded, scaled and rounded as the model does, then the k are summed in fp32.
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
    y = tl.sum(acc, axis=2).to(out_ty).to(tl.float32)
    tw = tl.load(tw_ptr + pair, mask=j_ok, other=0.0).to(out_ty).to(tl.float32)
    y = (y * tw[:, None]).to(out_ty).to(tl.float32)
    total = tl.sum(tl.where(j_ok[:, None], y, 0.0), axis=0)
    total = tl.where(bad > 0, float("nan"), total)
    tl.store(out_ptr + m * out_stride + n, total.to(out_ty), mask=n_ok)


@kernel
def _silu_mul_kernel(h_ptr, out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    p = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    out_ty = out_ptr.dtype.element_ty
    g = tl.load(h_ptr + p * 2 * N + n, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + p * 2 * N + N + n, mask=ok, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)
    tl.store(out_ptr + p * N + n, (silu * u).to(out_ty), mask=ok)


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


def _gemm(a, w, out, topk_ids, topk_weights, routing, plan: MoePlan, M: int, N: int, top_k: int, *,
          a_by_pair: bool, swiglu: bool, scale: bool, a_sorted: bool = False, out_sorted: bool = False,
          tiles: Optional[tuple] = None):
    E, K = w.shape[0], w.shape[2]
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
    # descriptors need whole tiles (a W tile past N would read the next expert's rows) and aligned rows
    tma = (plan.tma and even_k and even_n and w.is_contiguous() and (K * a.element_size()) % 16 == 0
           and w.data_ptr() % 16 == 0 and a.data_ptr() % 16 == 0)
    a_desc = a_tail_desc = w_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc = TensorDescriptor.from_tensor(w.view(E * w.shape[1], K), [block_n, block_k])
        if a_sorted:
            a_desc = TensorDescriptor.from_tensor(a, [plan.block_m, block_k])
            a_tail_desc = TensorDescriptor.from_tensor(a, [tail_m, block_k]) if tail_m else a_desc
    _moe_gemm_kernel.on(a.device)[grid](
        a, w, out, topk_ids, topk_weights, sorted_pairs, unit_expert, unit_start, unit_rows, a_desc, a_tail_desc,
        w_desc, M, N, K, num_units, w.shape[1], a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        TOP_K=top_k, SCAN=plan.routing == "scan", A_BY_PAIR=a_by_pair, SWIGLU=swiglu, SCALE=scale,
        IEEE=a.dtype == torch.float32 or on_cpu, UPCAST=on_cpu, A_SORTED=a_sorted, OUT_SORTED=out_sorted,
        GROUP_M=group_m, EVEN_K=even_k, EVEN_N=even_n, TMA_A=a_desc is not None, TMA_W=w_desc is not None,
        BM=plan.block_m, TM=tail_m, BN=block_n, BK=block_k, BKK=triton.next_power_of_2(top_k),
        num_warps=warps, num_stages=stages)


def _per_pair_impl(x, w13, w2, tw, ids, plan: MoePlan, out):
    """Two GEMV launches (three with SwiGLU unfused): GEMM1 per pair, GEMM2 per token summing its pairs."""
    M, H = x.shape
    E, I = w2.shape[0], w2.shape[2]
    top_k = ids.shape[1]
    P = M * top_k
    act = x.new_empty(P, I)
    n1 = I if plan.swiglu_fused else 2 * I
    h = act if plan.swiglu_fused else x.new_empty(P, n1)
    _moe_gemv_kernel.on(x.device)[(P, triton.cdiv(n1, plan.block_n))](
        x, w13, h, ids, n1, H, E, x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        TOP_K=top_k, SWIGLU=plan.swiglu_fused, BN=plan.block_n, BK=plan.block_k, num_warps=plan.num_warps)
    if not plan.swiglu_fused:
        _silu_mul_kernel.on(x.device)[(P, triton.cdiv(I, 1024))](h, act, I, BLOCK=1024)
    bn, bk, warps = plan.gemm2_tiles()
    _moe_gemv_sum_kernel.on(x.device)[(M, triton.cdiv(H, bn))](
        act, w2, out, ids, tw, H, I, E, act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), out.stride(0),
        TOP_K=top_k, BKK=triton.next_power_of_2(top_k), BN=bn, BK=bk, num_warps=warps)
    return out


def triton_impl(x, w13, w2, topk_weights, topk_ids, activation: str = "silu", plan: Optional[MoePlan] = None):
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
    if plan.routing == "per-pair":
        return _per_pair_impl(x, w13, w2, tw, ids, plan, out)
    routing = None if plan.routing == "scan" else sort_pairs(ids, E, plan.block_m, plan.routing, plan.tail_m)
    # sorted_act: GEMM1 writes the SwiGLU output at each pair's sorted slot, so GEMM2 reads contiguous tiles
    sorted_act = plan.sorted_act and routing is not None
    # padding slots of a sorted output are never written: zeros on the CPU keep the interpreter's numpy
    # from warning about the garbage rows it computes on and then drops
    scratch = x.new_zeros if sorted_act and x.device.type == "cpu" else x.new_empty
    act = scratch(routing.pairs.numel() if sorted_act else P, I)
    if plan.swiglu_fused:
        _gemm(x, w13, act, ids, tw, routing, plan, M, I, top_k, a_by_pair=False, swiglu=True, scale=False,
              out_sorted=sorted_act)
    else:
        h = scratch(act.shape[0], two_i)
        _gemm(x, w13, h, ids, tw, routing, plan, M, two_i, top_k, a_by_pair=False, swiglu=False, scale=False,
              out_sorted=sorted_act)
        _silu_mul_kernel.on(x.device)[(act.shape[0], triton.cdiv(I, 1024))](h, act, I, BLOCK=1024)
    per_pair = x.new_empty(P, H)
    _gemm(act, w2, per_pair, ids, tw, routing, plan, M, H, top_k, a_by_pair=True, swiglu=False, scale=True,
          a_sorted=sorted_act, tiles=plan.gemm2 or None)
    _sum_pairs_kernel.on(x.device)[(M, triton.cdiv(H, 1024))](
        per_pair, ids, out, H, E, TOP_K=top_k, BKK=triton.next_power_of_2(top_k), BLOCK=1024)
    return out


@torch.library.custom_op("kunlun::fused_moe", mutates_args=())
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str) -> torch.Tensor:
    check_args(x, w13, w2, topk_weights, topk_ids, activation)
    check_ids_in_range(topk_ids, w13.shape[0])
    if use_triton(x):
        return triton_impl(x, w13, w2, topk_weights, topk_ids, activation)
    return reference(x, w13, w2, topk_weights, topk_ids, activation)


@fused_moe.register_fake
def _(x, w13, w2, topk_weights, topk_ids, activation):
    check_args(x, w13, w2, topk_weights, topk_ids, activation)
    return x.new_empty(x.shape)
