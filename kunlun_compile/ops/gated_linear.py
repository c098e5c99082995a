"""kunlun::gated_linear — a linear layer whose input is a gated product, with an optional gated
residual epilogue:

    y = (x * act(gate)) @ weight.T          act: silu | sigmoid
    y = sigmoid(row_gate) * y               row_gate [M, 1], optional
    y = addend + y                          addend [M, N], optional

The forms decoders write around their projections: SwiGLU before a down projection
(`silu(g) * u`), Qwen3-Next's attention output gate before o_proj (`attn * sigmoid(gate)`), and its
shared expert, scaled by a per-token sigmoid gate and added to the routed experts' output.

At decode sizes the product and the epilogue run inside the GEMV of `kunlun::linear` (prologue on
its K tiles, epilogue before its store): the element-wise kernels they replace cost a launch each
(~1.2 µs in a CUDA graph, benchmarks/NOTES.md v10) for a few KB of data.  Where the plan is cuBLAS
the product and the epilogue are one small Triton kernel each around `F.linear` — as many launches
as the element-wise lowering would have made.

Rounding: the product is rounded to the dtype (as a kernel storing it would); the epilogue is
computed in fp32 with the GEMV's fp32 sums and rounded once.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..triton_kernel import contiguous_results, kernel, use_triton, wait_for_producers
from .linear import GATE_ACTIVATIONS, LinearPlan, _launch, for_interpreter, plan_linear


def check_args(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, activation: str,
               row_gate: Optional[torch.Tensor], addend: Optional[torch.Tensor]) -> None:
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gated_linear: activation must be one of {sorted(GATE_ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gated_linear: need x [M, K] and weight [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if gate.shape != x.shape:
        raise ValueError(f"gated_linear: gate {tuple(gate.shape)} must have x's shape {tuple(x.shape)}")
    if not x.is_floating_point() or weight.dtype != x.dtype or gate.dtype != x.dtype:
        raise ValueError(f"gated_linear: x, gate and weight must share one float dtype, got {x.dtype}, "
                         f"{gate.dtype}, {weight.dtype}")
    M, N = x.shape[0], weight.shape[0]
    if row_gate is not None and (tuple(row_gate.shape) != (M, 1) or row_gate.dtype != x.dtype):
        raise ValueError(f"gated_linear: row_gate must be [{M}, 1] of {x.dtype}, got {tuple(row_gate.shape)} "
                         f"{row_gate.dtype}")
    if addend is not None and (tuple(addend.shape) != (M, N) or addend.dtype != x.dtype):
        raise ValueError(f"gated_linear: addend must be [{M}, {N}] of {x.dtype}, got {tuple(addend.shape)} "
                         f"{addend.dtype}")


def reference(x, gate, weight, activation: str, row_gate=None, addend=None):
    act = F.silu(gate) if activation == "silu" else torch.sigmoid(gate)
    y = F.linear(x * act, weight)
    if row_gate is not None:
        y = torch.sigmoid(row_gate) * y
    if addend is not None:
        y = addend + y
    return y


# ---- the cuBLAS path's element-wise kernels ----------------------------------------------------

@kernel
def _gate_product_kernel(x_ptr, g_ptr, o_ptr, M, K, x_stride, g_stride, GATE_ACT: tl.constexpr,
                         BM: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (m < M)[:, None] & (k < K)[None, :]
    rows = m[:, None].to(tl.int64)
    a = tl.load(x_ptr + rows * x_stride + k[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows * g_stride + k[None, :], mask=ok, other=0.0).to(tl.float32)
    act = tl.sigmoid(g)
    if GATE_ACT == 1:
        act = g * act
    tl.store(o_ptr + rows * K + k[None, :], (a * act).to(o_ptr.dtype.element_ty), mask=ok)


@kernel
def _gated_residual_kernel(y_ptr, s_ptr, r_ptr, o_ptr, M, N, s_stride, r_stride, ROW_GATE: tl.constexpr,
                           ADDEND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = (m < M)[:, None] & (n < N)[None, :]
    rows = m[:, None].to(tl.int64)
    y = tl.load(y_ptr + rows * N + n[None, :], mask=ok, other=0.0).to(tl.float32)
    if ROW_GATE:
        y = y * tl.sigmoid(tl.load(s_ptr + m.to(tl.int64) * s_stride, mask=m < M, other=0.0).to(tl.float32))[:, None]
    if ADDEND:
        y += tl.load(r_ptr + rows * r_stride + n[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + rows * N + n[None, :], y.to(o_ptr.dtype.element_ty), mask=ok)


def _blocks(cols: int):
    bc = min(triton.next_power_of_2(max(cols, 1)), 1024)
    return max(1, 2048 // bc), bc


def _gate_product(x, gate, activation: str):
    M, K = x.shape
    out = x.new_empty(M, K)
    bm, bk = _blocks(K)
    _gate_product_kernel.on(x.device)[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        x, gate, out, M, K, x.stride(0), gate.stride(0), GATE_ACT=GATE_ACTIVATIONS[activation], BM=bm, BK=bk,
        num_warps=4)
    return out


def _gated_residual(y, row_gate, addend):
    M, N = y.shape
    bm, bn = _blocks(N)
    _gated_residual_kernel.on(y.device)[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        y, row_gate if row_gate is not None else y, addend if addend is not None else y, y, M, N,
        row_gate.stride(0) if row_gate is not None else 0, addend.stride(0) if addend is not None else 0,
        ROW_GATE=row_gate is not None, ADDEND=addend is not None, BM=bm, BN=bn, num_warps=4)
    return y


def _unit_columns(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def plan_gated_linear(rows: int, n: int, k: int) -> LinearPlan:
    """kunlun::linear's plan with 4 warps on the GEMV (its narrow plans have 4 already): the prologue's extra
    loads and sigmoids (H100 sweep, NOTES v11: o_proj 2048x4096 9.25 -> 8.65 µs at 2 columns per program; 2 warps
    are best without a prologue)."""
    plan = plan_linear(rows, n, k)
    return replace(plan, num_warps=4) if plan.path == "gemv" else plan


def triton_impl(x, gate, weight, activation: str, row_gate=None, addend=None, plan=None):
    M, K = x.shape
    N = weight.shape[0]
    if plan is None:
        plan = plan_gated_linear(M, N, K)
        plan = for_interpreter(plan, N) if x.device.type == "cpu" else plan
    x, gate, addend = _unit_columns(x), _unit_columns(gate), _unit_columns(addend)
    if M == 0:
        return reference(x, gate, weight, activation, row_gate, addend)
    if plan.path == "gemv" and weight.stride(1) == 1:
        return _launch(x, [weight], None, plan, gate, activation, row_gate, addend)[0]
    y = F.linear(_gate_product(x, gate, activation), weight)
    if row_gate is None and addend is None:
        return y
    return _gated_residual(y, row_gate, addend)


@torch.library.custom_op("kunlun::gated_linear", mutates_args=())
def gated_linear(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, activation: str,
                 row_gate: Optional[torch.Tensor] = None, addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_args(x, gate, weight, activation, row_gate, addend)
    if use_triton(x):
        return triton_impl(x, gate, weight, activation, row_gate, addend)
    return contiguous_results(reference(x, gate, weight, activation, row_gate, addend))


@gated_linear.register_fake
def _(x, gate, weight, activation, row_gate=None, addend=None):
    check_args(x, gate, weight, activation, row_gate, addend)
    return x.new_empty(x.shape[0], weight.shape[0])
