"""kunlun:: ops on a CUDA device at real sizes (skipped without one)."""
import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import add_rmsnorm, masked_input

from .conftest import rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("rows,cols", [(1, 2048), (4096, 2048), (333, 5120)])
def test_fused_add_rmsnorm_cuda(dtype, offset, rows, cols):
    x = torch.randn(rows, cols, device="cuda").to(dtype)
    r = torch.randn(rows, cols, device="cuda").to(dtype)
    w = ((offset == 0) + 0.3 * torch.randn(cols, device="cuda")).to(dtype)
    out, new_r = torch.ops.kunlun.fused_add_rmsnorm(x, r, w, 1e-6, offset)
    ref_out, ref_r = add_rmsnorm.reference(x, r, w, 1e-6, offset)
    assert torch.equal(new_r, ref_r)  # one fp32 add, rounded to nearest even: exact
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    else:  # the fp32 rsqrt / sum order may differ in the last bit; after rounding, rarely visible
        mismatched = (out != ref_out).float().mean().item()
        assert mismatched < 0.01, mismatched
    s = x.double() + r.double()
    want = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (w.double() + offset)
    assert rel_err(out, want) < {torch.float32: 1e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 2048), (4096, 4096)])
def test_rms_norm_and_sum_in_dtype_cuda(dtype, rows, cols):
    x = torch.randn(rows, cols, device="cuda").to(dtype)
    r = torch.randn(rows, cols, device="cuda").to(dtype)
    w = (1 + 0.3 * torch.randn(cols, device="cuda")).to(dtype)
    cases = [(torch.ops.kunlun.rms_norm(x, w, 1e-6, 0.0), add_rmsnorm.reference(x, None, w, 1e-6, 0.0)[0]),
             (torch.ops.kunlun.fused_add_rmsnorm(x, r, w, 1e-6, 0.0, True)[0],
              add_rmsnorm.reference(x, r, w, 1e-6, 0.0, True)[0])]
    for got, want in cases:
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert (got != want).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 333, 8192])
def test_qk_norm_rope_cuda(dtype, T):
    from kunlun_compile.ops import qk_norm_rope

    nq, nkv, D = 32, 8, 128
    proj = torch.randn(T, (nq + nkv) * D, device="cuda").to(dtype)  # q and k as views of one projection
    q, k = proj[:, :nq * D].view(T, nq, D), proj[:, nq * D:].view(T, nkv, D)
    qw = (1 + 0.3 * torch.randn(D, device="cuda")).to(dtype)
    kw = (1 + 0.3 * torch.randn(D, device="cuda")).to(dtype)
    angles = torch.rand(T, D // 2, device="cuda") * 6.28
    full = torch.cat([angles, angles], -1)
    for weights in [(qw, kw), (None, None)]:
        args = (q, k, *weights, full.cos().to(dtype), full.sin().to(dtype), 1e-6, 0.0, True)
        got = torch.ops.kunlun.qk_norm_rope(*args)
        want = qk_norm_rope.reference(*args)
        for g, w in zip(got, want):
            if dtype != torch.float32:
                assert (g != w).float().mean().item() < 0.01
            assert rel_err(g, w) < {torch.float32: 1e-6, torch.bfloat16: 4e-3}[dtype]
        # half-width tables (a complex table's parts, 2 columns apart: read in place in fp32, copied in bf16):
        # the widened table's bits
        parts = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(dtype)
        got = torch.ops.kunlun.qk_norm_rope(q, k, *weights, parts[..., 0], parts[..., 1], 1e-6, 0.0, True, False,
                                            True)
        want = torch.ops.kunlun.qk_norm_rope(q, k, *weights, qk_norm_rope.widened(parts[..., 0], True).contiguous(),
                                             qk_norm_rope.widened(parts[..., 1], True).contiguous(), 1e-6, 0.0, True)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        # the upcast form: float32 tables, float32 math, rounded once to q's dtype
        args = (q, k, *weights, full.cos(), full.sin(), 1e-6, 0.0, True, True)
        got = torch.ops.kunlun.qk_norm_rope(*args)
        want = qk_norm_rope.reference(*args)
        for g, w in zip(got, want):  # one rounding of float32 math that may contract into FMAs
            assert g.dtype == dtype and (dtype == torch.float32 or (g != w).float().mean().item() < 0.001)
            assert rel_err(g, w) < {torch.float32: 1e-6, torch.bfloat16: 1e-4}[dtype]


@pytest.mark.parametrize("n", [1, 64, 8192, 1 << 20])
def test_masked_input_cuda(n):
    ids = torch.randint(0, 152064, (n,), device="cuda")
    args = (38016, 76032, 64, 152064, 152100)
    got = torch.ops.kunlun.masked_input(ids, *args)
    want = masked_input.reference(ids, *args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- attention prologue, MoE, masks --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(16, 2, 256, 64, True, True, 1.0), (32, 4, 128, 128, False, True, 0.0),
                                   (8, 8, 64, 64, False, False, None)],
                         ids=["qwen3next", "qwen3", "gptj-no-norm"])
@pytest.mark.parametrize("T", [1, 333, 4096])
def test_split_norm_rope_gate_cuda(dtype, shape, T):
    from kunlun_compile.ops import norm_rope_gate

    nq, nkv, D, rot, gate, neox, offset = shape
    qkv = torch.randn(T, norm_rope_gate.qkv_columns(nq, nkv, D, gate), device="cuda").to(dtype)
    qw = kw = None
    if offset is not None:
        qw = ((offset == 0) + 0.3 * torch.randn(D, device="cuda")).to(dtype)
        kw = ((offset == 0) + 0.3 * torch.randn(D, device="cuda")).to(dtype)
    angles = torch.rand(4096, rot // 2, device="cuda") * 6.28
    cache = torch.cat([angles.cos(), angles.sin()], -1)
    pos = torch.randint(0, 4096, (T,), device="cuda")
    args = (qkv, qw, kw, cache, pos, nq, nkv, D, rot, 1e-6, offset or 0.0, gate, neox)
    got = torch.ops.kunlun.split_norm_rope_gate(*args)
    want = norm_rope_gate.reference(*args)
    assert torch.equal(got[2], want[2])
    for g, w in zip(got[:2], want[:2]):
        # same roundings step by step; the fp32 rsqrt / sum order may move a value by one unit, rarely
        if dtype != torch.float32:  # in fp32 the last bit differs everywhere; the relative error says enough
            assert (g != w).float().mean().item() < 0.01
        assert rel_err(g, w) < {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]


@pytest.mark.parametrize("case", [(128, 8, "softmax", True, 1, 1, False, 1.0),
                                  (256, 8, "sigmoid", True, 8, 4, True, 2.5)], ids=["qwen3moe", "deepseekv3"])
@pytest.mark.parametrize("M", [1, 77, 8192])
def test_moe_gate_cuda(case, M):
    from kunlun_compile.ops import moe_gate

    E, k, scoring, renorm, groups, tg, has_bias, scale = case
    logits = torch.randn(M, E, device="cuda")
    bias = 0.1 * torch.randn(E, device="cuda") if has_bias else None
    args = (logits, k, scoring, renorm, groups, tg, bias, scale)
    w, ids = torch.ops.kunlun.moe_gate(*args)
    want_w, want_ids = moe_gate.reference(*args)
    assert (ids != want_ids).float().mean().item() < 1e-3  # fp32 exp differs in the last bit: near-ties
    same = (ids == want_ids).all(1)
    torch.testing.assert_close(w[same], want_w[same], rtol=1e-5, atol=1e-6)


def routed_moe_inputs(M, E, H, I, k, dtype=torch.bfloat16, device="cuda"):
    """Tokens, expert weights scaled to keep activations O(1), and a softmax top-k router's choice."""
    x = torch.randn(M, H, device=device, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) / I ** 0.5).to(dtype)
    w, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=device), k, "softmax", True, 1, 1, None, 1.0)
    return x, w13, w2, w, ids


@pytest.mark.parametrize("M", [1, 16, 60, 200, 1024, 8192])  # small, small, medium, large, large+fused, large
def test_fused_moe_cuda(M):
    from kunlun_compile.ops import fused_moe
    from kunlun_compile.ops.moe_plan import plan_fused_moe

    E, k = 128, 8
    x, w13, w2, w, ids = routed_moe_inputs(M, E, 2048, 768, k)
    got = torch.ops.kunlun.fused_moe(x, w13, w2, w, ids, "silu")
    want = fused_moe.reference(x, w13, w2, w, ids)
    exact = fused_moe.reference(x.double(), w13.double(), w2.double(), w.double(), ids)
    assert rel_err(want, exact) < 1e-2, plan_fused_moe(M, k, E)
    assert rel_err(got, exact) < 1e-2, plan_fused_moe(M, k, E)
    assert rel_err(got, want) < 8e-3  # same roundings; GEMM accumulation order differs


@pytest.mark.parametrize("M", [1, 16, 200, 4096])  # per-pair GEMVs, scan, sorted, large (TMA on row-major)
def test_fused_moe_reads_k_major_weights_cuda(M):
    """Weights stored [E, K, N] (`torch._grouped_mm`'s layout) seen through a transpose: read in place by
    pointer loads, as close to float64 as the row-major run."""
    from kunlun_compile.ops import fused_moe

    x, w13, w2, w, ids = routed_moe_inputs(M, 64, 2048, 768, 4)
    k_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (w13, w2)]
    got = torch.ops.kunlun.fused_moe(x, *k_major, w, ids, "silu")
    row_major = torch.ops.kunlun.fused_moe(x, w13, w2, w, ids, "silu")
    exact = fused_moe.reference(x.double(), w13.double(), w2.double(), w.double(), ids)
    assert not got.isnan().any()
    assert rel_err(got, exact) < 1e-2 and rel_err(got, row_major) < 8e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 4096])
def test_prologues_with_torch_rmsnorm_rounding_cuda(dtype, T):
    """`weight_in_float` (the norm's weight multiplied in fp32, one rounding) through both prologue ops."""
    from kunlun_compile.ops import norm_rope_gate, qk_norm_rope

    nq, nkv, D = 16, 4, 128
    qkv = torch.randn(T, norm_rope_gate.qkv_columns(nq, nkv, D, True), device="cuda").to(dtype)
    qw, kw = [(1 + 0.3 * torch.randn(D, device="cuda")).to(dtype) for _ in range(2)]
    angles = torch.rand(4096, 32, device="cuda") * 6.28
    cache = torch.cat([angles.cos(), angles.sin()], -1)
    pos = torch.randint(0, 4096, (T,), device="cuda")
    args = (qkv, qw, kw, cache, pos, nq, nkv, D, 64, 1e-6, 0.0, True, True, True)
    q = torch.randn(T, nq, D, device="cuda").to(dtype)
    k = torch.randn(T, nkv, D, device="cuda").to(dtype)
    full = torch.cat([angles[pos], angles[pos]], -1)
    qk_args = (q, k, qw, kw, full.cos().to(dtype), full.sin().to(dtype), 1e-6, 0.0, True, False, False, True)
    for got, want in ((torch.ops.kunlun.split_norm_rope_gate(*args)[:2], norm_rope_gate.reference(*args)[:2]),
                      (torch.ops.kunlun.qk_norm_rope(*qk_args), qk_norm_rope.reference(*qk_args))):
        for g, w in zip(got, want):
            assert (g != w).float().mean().item() < 0.01  # the fp32 rsqrt / sum order: rarely one unit
            assert rel_err(g, w) < {torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]


@pytest.mark.parametrize("dtype", [torch.bool, torch.bfloat16, torch.float32])
def test_attention_mask_cuda(dtype):
    from kunlun_compile.ops import attention_mask

    pos = torch.arange(3000, device="cuda") + 7
    qp, kp = torch.randint(0, 500, (4, 300), device="cuda"), torch.randint(0, 500, (4, 513), device="cuda")
    valid = torch.rand(4, 513, device="cuda") > 0.2
    for args in [(pos, pos, None, True, 0, dtype, float("-inf")), (pos, pos, None, True, 512, dtype, -1e4),
                 (qp, kp, valid, True, 100, dtype, -1e4), (qp, kp, valid, False, 0, dtype, -1e4)]:
        assert torch.equal(torch.ops.kunlun.attention_mask(*args), attention_mask.reference(*args))


@pytest.mark.parametrize("tail_m", [0, 64])  # 64: experts' last rows in half-height units
@pytest.mark.parametrize("dtype,H,I", [(torch.float16, 2048, 768), (torch.float32, 1024, 384),
                                       (torch.bfloat16, 1000, 500)])  # last: tiles not whole (no TMA)
def test_fused_moe_large_path_cuda(dtype, H, I, tail_m):
    from dataclasses import replace

    from kunlun_compile.ops import fused_moe
    from kunlun_compile.ops.moe_plan import plan_fused_moe

    M, E, k = 4096, 64, 4  # 256 pairs per expert: the large plan with its swizzled grid and descriptors
    plan = plan_fused_moe(M, k, E)
    assert plan.tma
    x, w13, w2, w, ids = routed_moe_inputs(M, E, H, I, k, dtype)
    if tail_m:
        got = fused_moe.triton_impl(x, w13, w2, w, ids, plan=replace(plan, tail_m=tail_m))
    else:
        got = torch.ops.kunlun.fused_moe(x, w13, w2, w, ids, "silu")
    exact = fused_moe.reference(x.double(), w13.double(), w2.double(), w.double(), ids)
    assert not got.isnan().any()
    assert rel_err(got, exact) < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M, N, K", [(1, 2560, 2048), (1, 2048, 4096), (1, 2048, 768), (1, 9216, 2048),
                                     (4, 64, 2048), (16, 64, 2048), (3, 1, 2048), (1, 1000, 1000)])
def test_linear_cuda(dtype, M, N, K):
    """The GEMV plans at the built-in models' sizes (and a ragged one) against float64 and cuBLAS."""
    from kunlun_compile.ops import linear

    assert linear.plan_linear(M, N, K).path == "gemv"
    x = torch.randn(M, K, device="cuda").to(dtype)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    for bias in (b, None):
        got = torch.ops.kunlun.linear(x, w, bias)
        ref = want if bias is not None else want - b.double()
        assert rel_err(got, ref) < tol
        cublas = torch.nn.functional.linear(x, w, bias)
        assert rel_err(got, ref) <= 1.5 * rel_err(cublas, ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_linear_group_cuda(dtype, M):
    """Qwen3-Next's siblings (router 64, shared gate|up 1536, shared gate 1) of one hidden state: one launch
    at one row; GEMV for the narrow ones beside cuBLAS at 4 and 16; cuBLAS for all at 64."""
    K = 2048
    x = torch.randn(M, K, device="cuda").to(dtype)
    ws = [(torch.randn(n, K, device="cuda") / K ** 0.5).to(dtype) for n in (64, 1536, 1)]
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for got, w in zip(torch.ops.kunlun.linear_group(x, ws), ws):
        assert rel_err(got, torch.nn.functional.linear(x.double(), w.double())) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
@pytest.mark.parametrize("N, K, activation, epilogue", [(2048, 4096, "sigmoid", False), (2048, 768, "silu", True),
                                                        (2048, 768, "silu", False)])
def test_gated_linear_cuda(dtype, M, N, K, activation, epilogue):
    """Qwen3-Next's o_proj after the attention gate and its shared expert's down projection (with and
    without the gated residual): GEMV at one row, Triton product/epilogue around cuBLAS above; against
    float64, and no worse than the eager ops it replaces."""
    from kunlun_compile.ops import gated_linear

    gate_up = torch.randn(M, 2 * K, device="cuda").to(dtype)
    gate, x = gate_up[:, :K], gate_up[:, K:]
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    rg = torch.randn(M, 1, device="cuda").to(dtype) if epilogue else None
    r = torch.randn(M, N, device="cuda").to(dtype) if epilogue else None
    got = torch.ops.kunlun.gated_linear(x, gate, w, activation, rg, r)
    d = [None if t is None else t.double() for t in (x, gate, w, rg, r)]
    want = gated_linear.reference(d[0], d[1], d[2], activation, d[3], d[4])
    eager = gated_linear.reference(x, gate, w, activation, rg, r)
    assert not got.isnan().any()
    assert rel_err(got, want) < {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(got, want) <= 1.5 * rel_err(eager, want) + 1e-6
