"""kunlun::linear — `x @ weight.T (+ bias)` with a GEMV kernel at decode sizes.

At a few rows a linear layer is a weight read: the floor is N·K·elem bytes at copy bandwidth.
cuBLAS's kernels for one row (H100: 64x8 tiles by their names) take 6.9 µs for a 2560x2048
bf16 projection whose weight read is 3.5 µs, and 5.2 µs for the 64-column router's 256 KB
(benchmarks/NOTES.md v10).  Here one program owns one or two output columns for all rows of
the call, so the weight is read once, spread over N/BN programs.  Where cuBLAS is the better
kernel the op calls `F.linear`; the choice is `plan_linear`, a pure function of the sizes,
made at each call, so one graph serves every batch size (a CUDA graph captures one size,
hence one choice).

Rounding: products summed in fp32 (in another order than cuBLAS's), bias added in fp32, one
rounding to the dtype — as cuBLAS's epilogue does.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..triton_kernel import kernel, use_triton, wait_for_producers

# H100 sweep (benchmarks/NOTES.md v10, bf16, weights read from HBM): at one row the GEMV beats
# cuBLAS on every linear of the built-in models (e.g. 2560x2048 5.7 vs 6.9 µs, 2048x4096 8.2 vs
# 11.1); at 4 rows cuBLAS wins on wide outputs (2560x2048 6.8 vs 8.5) and the GEMV on narrow ones
# (the 64-column router 3.1 vs 5.3 µs; cuBLAS runs it on one CTA) — narrow ones up to 16 rows.
NARROW_N = 64
GEMV_MAX_ROWS = 1
GEMV_MAX_ROWS_NARROW = 16


@dataclass(frozen=True)
class LinearPlan:
    path: str  # "gemv" | "cublas"
    rows: int  # rows per program (a power of two >= the call's rows)
    block_n: int
    block_k: int
    num_warps: int

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.path != "gemv":
            return "F.linear (cuBLAS)"
        # rows per program is the call's row count rounded up to a power of two: not shown
        return f"GEMV, {self.block_n} column(s) per program, K tile {self.block_k}, {self.num_warps} warps"


def plan_linear(rows: int, n: int, k: int) -> LinearPlan:
    if rows < 0 or n < 1 or k < 1:
        raise ValueError(f"plan_linear: bad sizes rows={rows}, N={n}, K={k}")
    narrow = n <= NARROW_N
    if rows == 0 or rows > (GEMV_MAX_ROWS_NARROW if narrow else GEMV_MAX_ROWS):
        return LinearPlan("cublas", 0, 0, 0, 0)
    # long K tiles (fewer loop trips, more bytes in flight); 2-column programs on wide outputs
    # (1280 programs for 2560 columns) beat 4-16 columns by 3-15% in the sweep
    block_k = min(max(triton.next_power_of_2(k), 16), 1024)
    if narrow:
        return LinearPlan("gemv", triton.next_power_of_2(rows), 1, block_k, 4)
    return LinearPlan("gemv", 1, 2, block_k, 2)


def for_interpreter(plan: LinearPlan, n: int) -> LinearPlan:
    """Wider column blocks for Triton's interpreter on the CPU, which pays per program (the GPU
    plan's 1-2 column programs would make a 4096-column lm head 2048 interpreted programs)."""
    if plan.path != "gemv":
        return plan
    from dataclasses import replace

    return replace(plan, block_n=min(triton.next_power_of_2(n), 64), block_k=min(plan.block_k, 128))


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: need x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if not x.is_floating_point() or weight.dtype != x.dtype:
        raise ValueError(f"linear: x and weight must share one float dtype, got {x.dtype}, {weight.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0] or bias.dtype != x.dtype):
        raise ValueError(f"linear: bias must be [{weight.shape[0]}] of {x.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")


def reference(x, weight, bias=None):
    return F.linear(x, weight, bias)


MAX_GROUP = 4  # weights one kunlun::linear_group launch reads


@kernel
def _gemv_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, b_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, M, K,
                 n0, n1, n2, n3, x_stride, ws0, ws1, ws2, ws3, os0, os1, os2, os3,
                 g_ptr, g_stride, s_ptr, s_stride, r_ptr, r_stride,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, EVEN: tl.constexpr, GATE_ACT: tl.constexpr, ROW_GATE: tl.constexpr,
                 ADDEND: tl.constexpr, PDL: tl.constexpr):
    """out[rows, n-block] = x[rows] @ W[n-block]^T: products kept in an fp32 [ROWS, BN, BK] tile
    and reduced once at the end.  GROUP > 1: the programs are split over GROUP weights (n-blocks of
    w0 first, then w1, ...), each with its own output.  EVEN: every N % BN == 0 and K % BK == 0, the
    weight loads need no mask.

    kunlun::gated_linear's prologue and epilogue (GROUP == 1): GATE_ACT 1 / 2 reads x as
    `x * silu(g)` / `x * sigmoid(g)` (each program recomputes its K tiles: the gate is a few KB
    from L2, where a separate kernel would cost a launch); ROW_GATE scales each output row by
    `sigmoid(s[row])`; ADDEND adds `r`.  One rounding, at the store."""
    wait_for_producers(PDL)
    pid = tl.program_id(0)
    zero = pid * 0  # the selected values must be tensors in both branches (an int arg of 1 is a constant)
    w_ptr, o_ptr, w_stride, o_stride, N, first = w0_ptr, o0_ptr, ws0 + zero, os0 + zero, n0 + zero, zero
    if GROUP > 1:
        end = tl.cdiv(n0, BN)
        if pid >= end:
            w_ptr, o_ptr, w_stride, o_stride, N, first = w1_ptr, o1_ptr, ws1 + zero, os1 + zero, n1 + zero, end + zero
        if GROUP > 2:
            end += tl.cdiv(n1, BN)
            if pid >= end:
                w_ptr, o_ptr, w_stride, o_stride, N, first = (w2_ptr, o2_ptr, ws2 + zero, os2 + zero, n2 + zero,
                                                               end + zero)
            if GROUP > 3:
                end += tl.cdiv(n2, BN)
                if pid >= end:
                    w_ptr, o_ptr, w_stride, o_stride, N, first = (w3_ptr, o3_ptr, ws3 + zero, os3 + zero,
                                                                   n3 + zero, end + zero)
    m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    n = (pid - first) * BN + tl.arange(0, BN)
    kc = tl.arange(0, BK)
    m_ok = m < M
    n_ok = n < N
    x_rows = x_ptr + m[:, None].to(tl.int64) * x_stride
    g_rows = g_ptr + m[:, None].to(tl.int64) * g_stride
    w_rows = w_ptr + n[:, None].to(tl.int64) * w_stride
    acc = tl.zeros([ROWS, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kc
        if EVEN:
            w = tl.load(w_rows + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
        if GATE_ACT != 0:
            g = tl.load(g_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0).to(tl.float32)
            act = tl.sigmoid(g)
            if GATE_ACT == 1:
                act = g * act
            # rounded to the input dtype, as the product kernel it replaces stored it
            a = (a * act).to(x_ptr.dtype.element_ty).to(tl.float32)
        acc += a[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if ROW_GATE:
        s = tl.load(s_ptr + m.to(tl.int64) * s_stride, mask=m_ok, other=0.0).to(tl.float32)
        y = y * tl.sigmoid(s)[:, None]
    if ADDEND:
        y += tl.load(r_ptr + m[:, None].to(tl.int64) * r_stride + n[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + m[:, None].to(tl.int64) * o_stride + n[None, :], y.to(o0_ptr.dtype.element_ty), mask=out_ok)


GATE_ACTIVATIONS = {"silu": 1, "sigmoid": 2}  # kunlun::gated_linear's prologue, as the kernel's GATE_ACT


def _launch(x, weights, bias, plan: LinearPlan, gate=None, activation: str = "", row_gate=None,
            addend=None) -> List[torch.Tensor]:
    """One launch over `weights` (row-major, at most MAX_GROUP); one output each.  `gate`,
    `row_gate`, `addend` (one weight only): kunlun::gated_linear's prologue and epilogue, each
    tensor with unit column stride."""
    M, K = x.shape
    ns = [w.shape[0] for w in weights]
    outs = [x.new_empty(M, n) for n in ns]
    pad = MAX_GROUP - len(weights)
    blocks = sum(triton.cdiv(n, plan.block_n) for n in ns)
    extras = [(t, t.stride(0)) if t is not None else (x, 0) for t in (gate, row_gate, addend)]
    _gemv_kernel.on(x.device)[(blocks, triton.cdiv(M, plan.rows))](
        x, *weights, *[x] * pad, bias if bias is not None else x, *outs, *[x] * pad, M, K, *ns, *[0] * pad,
        x.stride(0), *[w.stride(0) for w in weights], *[0] * pad, *[o.stride(0) for o in outs], *[0] * pad,
        *[v for pair in extras for v in pair],
        GROUP=len(weights), HAS_BIAS=bias is not None, ROWS=plan.rows, BN=plan.block_n, BK=plan.block_k,
        EVEN=all(n % plan.block_n == 0 for n in ns) and K % plan.block_k == 0,
        GATE_ACT=GATE_ACTIVATIONS[activation] if gate is not None else 0, ROW_GATE=row_gate is not None,
        ADDEND=addend is not None, num_warps=plan.num_warps)
    return outs


def triton_impl(x, weight, bias=None, plan: Optional[LinearPlan] = None):
    M, K = x.shape
    N = weight.shape[0]
    if plan is None:
        plan = plan_linear(M, N, K)
        plan = for_interpreter(plan, N) if x.device.type == "cpu" else plan
    if plan.path != "gemv" or weight.stride(1) != 1:
        return reference(x, weight, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at n: a strided view (a slice of a fused bias) copies
    return _launch(x, [weight], bias, plan)[0]


def plan_linear_group(rows: int, ns: Sequence[int], k: int) -> Tuple[LinearPlan, List[int]]:
    """The weights whose own plan is the GEMV (their indices) share one launch on the widest one's
    tiles; the others run cuBLAS, one call each."""
    plans = [plan_linear(rows, n, k) for n in ns]
    gemv = [i for i, p in enumerate(plans) if p.path == "gemv"]
    if not gemv:
        return LinearPlan("cublas", 0, 0, 0, 0), []
    return max((plans[i] for i in gemv), key=lambda p: p.block_n), gemv


def describe_linear_group(rows: int, ns: Sequence[int], k: int) -> str:
    plan, gemv = plan_linear_group(rows, ns, k)
    if len(ns) == 1 or not gemv:
        return plan.describe()
    text = plan.describe() + (", one launch" if len(gemv) > 1 else "")
    rest = [str(n) for i, n in enumerate(ns) if i not in gemv]
    return text if not rest else f"{text} for {'+'.join(str(ns[i]) for i in gemv)}; F.linear (cuBLAS) for " \
                                 f"{'+'.join(rest)}"


def triton_group_impl(x, weights: List[torch.Tensor], plan: Optional[LinearPlan] = None) -> List[torch.Tensor]:
    """`plan` (tests, sweeps): one GEMV plan for every weight."""
    M, K = x.shape
    ns = [w.shape[0] for w in weights]
    if plan is None:
        plan, gemv = plan_linear_group(M, ns, K)
        plan = for_interpreter(plan, max(ns)) if x.device.type == "cpu" else plan
    else:
        gemv = list(range(len(weights)))
    gemv = [i for i in gemv if weights[i].stride(1) == 1]
    outs = {}
    if gemv:
        x_rows = x if x.stride(1) == 1 else x.contiguous()
        for start in range(0, len(gemv), MAX_GROUP):
            chunk = gemv[start:start + MAX_GROUP]
            outs.update(zip(chunk, _launch(x_rows, [weights[i] for i in chunk], None, plan)))
    return [outs[i] if i in outs else F.linear(x, w) for i, w in enumerate(weights)]


def group_reference(x, weights) -> List[torch.Tensor]:
    return [F.linear(x, w) for w in weights]


def check_group_args(x: torch.Tensor, weights: List[torch.Tensor]) -> None:
    if not weights:
        raise ValueError("linear_group: no weights")
    for w in weights:
        check_args(x, w, None)


@torch.library.custom_op("kunlun::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    check_args(x, weight, bias)
    if use_triton(x):
        return triton_impl(x, weight, bias)
    return reference(x, weight, bias)


@linear.register_fake
def _(x, weight, bias=None):
    check_args(x, weight, bias)
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("kunlun::linear_group", mutates_args=())
def linear_group(x: torch.Tensor, weights: List[torch.Tensor]) -> List[torch.Tensor]:
    """`[x @ w.T for w in weights]`: sibling linears of one input, in one GEMV launch at decode sizes."""
    check_group_args(x, weights)
    if use_triton(x):
        return triton_group_impl(x, weights)
    return group_reference(x, weights)


@linear_group.register_fake
def _(x, weights):
    check_group_args(x, weights)
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]
