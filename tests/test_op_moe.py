"""kunlun::moe_gate and kunlun::fused_moe (every execution path) against float64 math."""
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import cpu_kernels, fused_moe
from kunlun_compile.ops.moe_plan import MoePlan, plan_fused_moe
from kunlun_compile.ops.moe_routing import sort_pairs

from .conftest import rel_err
from .op_helpers import (BOUND_C, PATHS, U_ACC, UNIT_ROUNDOFF, assert_close_to_float64, needs_interpreter, seeded,
                         stable_seed)

# ---- moe_gate ------------------------------------------------------------------------------------

# E, top_k, scoring, renormalize, num_groups, topk_group, bias, scale
GATE_CASES = [
    (16, 4, "softmax", True, 1, 1, False, 1.0),  # Qwen3-MoE
    (16, 2, "softmax", False, 1, 1, False, 1.0),  # Mixtral-like, no renormalisation
    (64, 6, "sigmoid", True, 8, 3, True, 2.5),  # DeepSeek-V3: grouped, biased, scaled; k not 2^n
    (32, 3, "softmax", False, 4, 2, False, 1.0),  # grouped without bias: group max
    (128, 8, "sigmoid", False, 1, 1, True, 1.0),  # bias without groups
]


def gate_float64(logits, top_k, scoring, renormalize, num_groups, topk_group, bias, scale):
    """Row by row from the definition: rank experts by (-score, index)."""
    weights, ids = [], []
    for row in logits.double():
        s = torch.softmax(row, 0) if scoring == "softmax" else torch.sigmoid(row)
        c = s + bias.double() if bias is not None else s
        allowed = set(range(len(row)))
        if num_groups > 1:
            per = len(row) // num_groups
            scores = []
            for g in range(num_groups):
                vals = sorted(c[g * per:(g + 1) * per].tolist(), reverse=True)
                scores.append(vals[0] + vals[1] if bias is not None else vals[0])
            groups = sorted(range(num_groups), key=lambda g: (-scores[g], g))[:topk_group]
            allowed = {g * per + j for g in groups for j in range(per)}
        chosen = sorted(allowed, key=lambda e: (-c[e].item(), e))[:top_k]
        w = s[chosen]
        if renormalize:
            w = w / w.sum()
        weights.append(w * scale)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"E{c[0]}-k{c[1]}-{c[2]}-g{c[4]}")
def test_moe_gate(path, dtype, case):
    E, k, scoring, renorm, groups, topk_group, has_bias, scale = case
    gen = seeded("gate", path, dtype, case)
    logits = torch.randn(11, E, generator=gen).to(dtype)
    bias = 0.1 * torch.randn(E, generator=gen) if has_bias else None
    args = (logits, k, scoring, renorm, groups, topk_group, bias, scale)
    with cpu_kernels(path == "triton"):
        w, ids = torch.ops.kunlun.moe_gate(*args)
    want_w, want_ids = gate_float64(*args)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (11, k)
    assert torch.equal(ids, want_ids)
    assert rel_err(w, want_w) < 1e-6


@pytest.mark.parametrize("path", PATHS)
def test_moe_gate_ties_go_to_the_lower_index(path):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 2.0, 2.0, 0.0]]).repeat(3, 1)
    with cpu_kernels(path == "triton"):
        _, ids = torch.ops.kunlun.moe_gate(logits, 5, "softmax", True, 1, 1, None, 1.0)
        _, gids = torch.ops.kunlun.moe_gate(logits, 2, "sigmoid", True, 4, 2, None, 1.0)
    assert ids[0].tolist() == [1, 2, 4, 5, 6]
    assert gids[0].tolist() == [1, 2]  # groups {0,1} and {2,3} tie on max 3.0 with {4,5}: lower groups win


@needs_interpreter
def test_moe_gate_agrees_with_the_model_router():
    from kunlun_compile.models.layers import select_experts

    gen = seeded("router")
    for case in GATE_CASES:
        E, k, scoring, renorm, groups, topk_group, has_bias, scale = case
        logits = torch.randn(9, E, generator=gen)
        bias = 0.1 * torch.randn(E, generator=gen) if has_bias else None
        args = (logits, k, scoring, renorm, groups, topk_group, bias, scale)
        want_w, want_ids = select_experts(*args)
        w, ids = torch.ops.kunlun.moe_gate(*args)
        # the model may list the k experts in another order (topk sorted=False); the set and weights agree
        order, want_order = ids.long().argsort(1), want_ids.long().argsort(1)
        assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
        torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order))


def test_moe_gate_bad_args_and_opcheck():
    gen = seeded("gate-bad-args")
    x = torch.randn(4, 16, generator=gen)
    op = torch.ops.kunlun.moe_gate
    with pytest.raises(ValueError, match="scoring"):
        op(x, 2, "relu", True, 1, 1, None, 1.0)
    with pytest.raises(ValueError, match="divide"):
        op(x, 2, "softmax", True, 3, 1, None, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        op(x, 9, "softmax", True, 4, 2, None, 1.0)  # only 2 groups of 4 can be chosen
    with pytest.raises(ValueError, match="correction_bias"):
        op(x, 2, "softmax", True, 1, 1, torch.randn(15, generator=gen), 1.0)
    torch.library.opcheck(op.default, (x, 3, "sigmoid", True, 4, 2, torch.randn(16, generator=gen), 2.5))


# ---- fused_moe -----------------------------------------------------------------------------------

def test_plan_thresholds():
    assert plan_fused_moe(1, 8, 128).path == "small"
    assert plan_fused_moe(49, 8, 128).path == "small"  # 392 pairs
    assert plan_fused_moe(50, 8, 128).path == "medium"  # 400
    assert plan_fused_moe(96, 8, 128).path == "medium"  # 768
    assert plan_fused_moe(97, 8, 128).path == "large"  # 776
    assert [plan_fused_moe(m, 1, 8).path for m in (399, 400, 768, 769)] == ["small", "medium", "medium", "large"]
    assert [plan_fused_moe(m, 8, 128).routing for m in (1, 4, 5, 60, 8192)] == [
        "per-pair", "per-pair", "scan", "argsort", "block-histogram"]
    assert all(plan_fused_moe(m, 8, 128).swiglu_fused for m in (1, 60, 1023, 1024, 8192))  # measured: never slower
    assert (plan_fused_moe(8192, 8, 128).block_m, plan_fused_moe(200, 8, 128).block_m) == (128, 16)
    assert "small path (8 pairs)" in plan_fused_moe(1, 8, 128).describe()
    assert "GEMM2 128x256x64/8 warps" in plan_fused_moe(8192, 8, 128).describe()
    assert "last rows in 64-row tiles" in plan_fused_moe(8192, 8, 128).describe()
    assert plan_fused_moe(1024, 8, 128).tail_m == 0  # 64-row plan: tails measured within noise
    with pytest.raises(ValueError):
        plan_fused_moe(4, 0, 8)


def test_shared_memory_fit_counts_both_gemms():
    from kunlun_compile.ops.moe_plan import SHARED_MEMORY_BUDGET, fit_shared_memory

    large = plan_fused_moe(8192, 8, 128)  # GEMM1 128 + 2x128 rows, GEMM2 128 + 256 rows, K tile 64, 4 stages
    assert fit_shared_memory(large, 2) == large  # bf16: 192 KB for either GEMM
    fp32 = fit_shared_memory(large, 4)
    assert fp32.num_stages == 2 and fp32.block_k == 64
    wide = replace(large, gemm2=(512, 64, 8))  # only GEMM2's tile is over the budget at 2 stages
    fitted = fit_shared_memory(wide, 4)
    assert (128 + 512) * fitted.block_k * 4 * fitted.num_stages <= SHARED_MEMORY_BUDGET


def moe_inputs(M, E, H, I, k, dtype, gen):
    x = torch.randn(M, H, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).to(torch.int32)
    weights = torch.rand(M, k, generator=gen)
    return x, w13, w2, weights, ids


def moe_float64(x, w13, w2, weights, ids):
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    I = w2.shape[2]
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for j, e in enumerate(ids[m].tolist()):
            h = w13[e] @ x[m]
            out[m] += weights[m, j] * (w2[e] @ (F.silu(h[:I]) * h[I:]))
    return out


def moe_bound(x, w13, w2, weights, ids, c=BOUND_C):
    """Per output element, the error bound of tests/op_helpers.py carried through the op's chain, to first
    order, in float64: each GEMM adds U_ACC sqrt(K) sum|terms| (fp32 accumulation) and each step rounded to
    the dtype (GEMM1's h, silu(gate), silu * up, GEMM2's y, the routing weight and weight * y, the sum over the
    k pairs) adds u_out times its size; an error in h goes through silu' and the product, an error in the
    activation through |w2|. A fixed relative bound instead is flaky where an output cancels and loose
    elsewhere. Returns (bound, condition = sum_j |weight_j| sum_i |w2 a|, the size of the last reduction)."""
    u, v = U_ACC, UNIT_ROUNDOFF[x.dtype]
    H, I = x.shape[1], w2.shape[2]
    W1, W2 = w13.double()[ids.long()], w2.double()[ids.long()]  # [M, k, 2I, H], [M, k, H, I]
    xd = x.double()
    h = torch.einsum("mkih,mh->mki", W1, xd)
    eh = u * H ** 0.5 * torch.einsum("mkih,mh->mki", W1.abs(), xd.abs()) + v * h.abs()
    g, up, eg, eu = h[..., :I], h[..., I:], eh[..., :I], eh[..., I:]
    sg = torch.sigmoid(g)
    s = g * sg
    es = (sg * (1 + g * (1 - sg))).abs() * eg + v * s.abs()  # |silu'| * error of g, then silu's rounding
    a = s * up
    ea = up.abs() * es + s.abs() * eu + es * eu + v * a.abs()
    y = torch.einsum("mkhi,mki->mkh", W2, a)
    cy = torch.einsum("mkhi,mki->mkh", W2.abs(), a.abs())
    ey = torch.einsum("mkhi,mki->mkh", W2.abs(), ea) + u * I ** 0.5 * cy + v * y.abs()
    wt = weights.double().abs()[..., None]
    pair = wt * y.abs()
    bound = (wt * ey + 2 * v * pair).sum(1) + v * ids.shape[1] * pair.sum(1)
    return c * bound + torch.finfo(x.dtype).tiny, (wt * cy).sum(1)


MOE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# The interpreter's fp32 -> bf16 conversion is biased towards zero, and the op rounds four times (GEMM,
# silu, product, weighted output): interpreted bf16 lands at ~2.4e-2 where the GPU's RTNE gives < 2e-2.
INTERPRETED_TOL = {**MOE_TOL, torch.bfloat16: 4e-2}


def assert_moe_close(out, args, rtol, what="fused_moe"):
    """Per element within moe_bound (worst case through the chain, so per element it can be the looser
    one: ~0.2 of |out| norm-wise in bf16), and norm-wise within rtol over the whole output (hundreds of
    elements: no single cancelling one dominates the norm), which holds the aggregate tight."""
    want = moe_float64(*args)
    bound, cond = moe_bound(*args)
    assert_close_to_float64(out, want, bound=bound, cond=cond, what=what)
    assert_close_to_float64(out, want, rtol=rtol, what=what)

# forced plans, so every path runs at sizes the interpreter handles: path, routing, swiglu fused, tiles
FORCED_PLANS = [
    MoePlan("small", 0, "per-pair", True, 1, 16, 32, 4, 2, gemm2=(8, 16, 4)),
    MoePlan("small", 0, "per-pair", False, 1, 32, 16, 4, 2),
    MoePlan("small", 0, "scan", False, 16, 32, 32, 4, 2),
    MoePlan("small", 0, "scan", True, 16, 32, 32, 4, 2),
    MoePlan("medium", 0, "argsort", False, 16, 32, 32, 4, 2),
    MoePlan("large", 0, "block-histogram", True, 16, 32, 32, 4, 2),
    MoePlan("large", 0, "block-histogram", False, 32, 16, 16, 4, 2),
    # 1-D swizzled grid; GEMM1 writes the SwiGLU output in sorted order and GEMM2 reads it contiguous
    MoePlan("large", 0, "block-histogram", True, 16, 32, 32, 4, 2, gemm2=(16, 16, 4), group_m=4, sorted_act=True),
    MoePlan("medium", 0, "argsort", False, 16, 16, 16, 4, 2, group_m=2, sorted_act=True),
    MoePlan("large", 0, "block-histogram", True, 16, 16, 16, 4, 2, group_m=4, sorted_act=True, tma=True),
    # experts' last rows in half-height units: swizzled with sorted output and descriptors; 2-D grid, unsorted
    MoePlan("large", 0, "block-histogram", True, 16, 16, 16, 4, 2, group_m=4, sorted_act=True, tma=True,
            tail_m=8),
    MoePlan("medium", 0, "argsort", False, 32, 16, 16, 4, 2, tail_m=16),
]


def plan_id(p):
    return (f"{p.routing}-fused{int(p.swiglu_fused)}-bm{p.block_m}" + (f"-g{p.group_m}-sorted" if p.group_m else "")
            + ("-tma" if p.tma else "") + (f"-tail{p.tail_m}" if p.tail_m else ""))


# H, I not multiples of the tiles (masked loads) in every dtype; multiples (the grouped GEMM's unmasked
# loads and descriptors; the per-pair GEMVs have one form) in bf16
PLAN_SHAPES = [pytest.param(dtype, p, H, I, id=f"{plan_id(p)}-{H}x{I}-{str(dtype)[6:]}") for p in FORCED_PLANS
               for dtype in (torch.float32, torch.bfloat16, torch.float16)
               for H, I in ([(48, 40)] if p.routing == "per-pair" or dtype != torch.bfloat16 else [(48, 40), (64, 32)])]


@needs_interpreter
@pytest.mark.parametrize("dtype,plan,H,I", PLAN_SHAPES)
def test_fused_moe_every_kernel_path(dtype, plan, H, I):
    M, E, k = 37, 8, 3  # 37 tokens span 3 scan chunks
    args = moe_inputs(M, E, H, I, k, dtype, seeded("paths", dtype, plan, H))
    with cpu_kernels(True):
        out = fused_moe.triton_impl(*args, plan=plan)
    assert out.dtype == dtype and out.shape == (M, H)
    assert_moe_close(out, args, INTERPRETED_TOL[dtype])


def k_major(w: torch.Tensor) -> torch.Tensor:
    """The same [E, N, K] weights, stored [E, K, N] (`torch._grouped_mm`'s layout) and seen through a transpose."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


@needs_interpreter
@pytest.mark.parametrize("plan", FORCED_PLANS, ids=plan_id)
def test_fused_moe_reads_k_major_weights_in_place(plan, monkeypatch):
    """Weights stored [E, K, N] are read through their strides, not copied: the result is the one the same
    plan gives on row-major weights, bit for bit (descriptors, which need row-major tiles, are not used)."""
    M, E, k, H, I, dtype = 37, 8, 3, 64, 32, torch.bfloat16  # bf16: the dtype torch._grouped_mm models use
    x, w13, w2, weights, ids = moe_inputs(M, E, H, I, k, dtype, seeded("k-major", plan))
    w13_k, w2_k = k_major(w13), k_major(w2)
    seen = []  # the weight storages the kernels' launchers were handed
    gemm, per_pair = fused_moe._gemm, fused_moe._per_pair_impl
    monkeypatch.setattr(fused_moe, "_gemm", lambda a, w, *r, **kw: seen.append(w.data_ptr()) or gemm(a, w, *r, **kw))
    monkeypatch.setattr(fused_moe, "_per_pair_impl", lambda x_, a, b, *r: seen.extend((a.data_ptr(), b.data_ptr()))
                        or per_pair(x_, a, b, *r))
    with cpu_kernels(True):
        want = fused_moe.triton_impl(x, w13, w2, weights, ids, plan=plan)
        seen.clear()
        got = fused_moe.triton_impl(x, w13_k, w2_k, weights, ids, plan=plan)
    assert seen and set(seen) <= {w13_k.data_ptr(), w2_k.data_ptr()}  # no copy of the weights
    assert not torch.isnan(want).any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M,k", [(3, 2), (250, 2), (800, 1)])  # small, medium, large by the plan
def test_fused_moe_op_chooses_its_path(path, M, k):
    dtype = torch.bfloat16
    args = moe_inputs(M, 8, 32, 16, k, dtype, seeded("op", path, M))
    with cpu_kernels(path == "triton"):
        out = torch.ops.kunlun.fused_moe(*args, "silu")
    assert_moe_close(out, args, (MOE_TOL if path == "reference" else INTERPRETED_TOL)[dtype])


@needs_interpreter
def test_fused_moe_matches_the_model_experts_bf16():
    from kunlun_compile.models.layers import experts_forward

    args = moe_inputs(21, 8, 64, 32, 2, torch.bfloat16, seeded("model"))
    want = experts_forward(*args)
    assert torch.equal(fused_moe.reference(*args), want)  # same roundings, step by step
    with cpu_kernels(True):
        got = torch.ops.kunlun.fused_moe(*args, "silu")
    assert rel_err(got, want) < 3e-2  # interpreter's bf16 rounding; exactness is checked on the GPU


@needs_interpreter
@pytest.mark.parametrize("routing", ["argsort", "block-histogram"])
@pytest.mark.parametrize("M", [300, 4500])  # 4500 x 2 pairs: 71 histogram blocks, more than one prefix tile
@pytest.mark.parametrize("tail_m", [0, 8])
def test_sort_pairs_units(routing, M, tail_m):
    gen = seeded("sort", routing, M)
    E, k, bm = 12, 2, 16
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).to(torch.int32)
    with cpu_kernels(True):
        routed = sort_pairs(ids, E, bm, routing, tail_m)
    P = M * k
    flat = ids.flatten()
    real = routed.pairs[routed.pairs < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    num_units, num_tails = routed.num_units.tolist()
    covered, order = [], []
    for u, (e, start, rows) in enumerate(zip(*(t.tolist() for t in routed[1:4]))):
        assert (e >= 0) == (u < num_units), (u, e)
        if e < 0:
            continue
        assert rows == bm or (tail_m and rows == tail_m)
        unit = routed.pairs[start:start + rows]
        pairs = unit[unit < P].long()
        assert pairs.numel() > 0 and (flat[pairs] == e).all()
        covered += list(range(start, start + rows))
        order.append(e)
    assert order == sorted(order)  # units in expert order: a tail runs next to its expert's blocks
    assert sorted(covered) == sorted(set(covered))  # units do not overlap
    assert set(torch.nonzero(routed.pairs < P).flatten().tolist()) <= set(covered)  # and hold every pair
    counts = torch.bincount(flat.long(), minlength=E)
    rows = routed.unit_rows[:num_units]
    if tail_m:  # an expert whose last rows fit in a tail has one
        assert num_tails == int((rows == tail_m).sum()) == int(((counts % bm > 0) & (counts % bm <= tail_m)).sum())
    else:
        assert num_tails == 0 and num_units == int(((counts + bm - 1) // bm).sum())


def test_sort_pairs_refuses_a_tail_not_below_the_block():
    with pytest.raises(ValueError, match="tail_m"):
        sort_pairs(torch.zeros(4, 2, dtype=torch.int32), 4, 16, "argsort", 16)


def test_fused_moe_ids_out_of_range():
    args = list(moe_inputs(5, 4, 16, 8, 2, torch.float32, seeded("range")))
    args[4][2, 1] = 4
    with cpu_kernels(False), pytest.raises(ValueError, match=r"topk_ids must be in \[0, 4\)"):
        torch.ops.kunlun.fused_moe(*args, "silu")


ONE_PLAN_PER_ROUTING = list({p.routing: p for p in reversed(FORCED_PLANS)}.values())


@needs_interpreter
@pytest.mark.parametrize("plan", ONE_PLAN_PER_ROUTING, ids=lambda p: p.routing)
def test_fused_moe_kernel_marks_bad_ids_nan(plan):
    """On a GPU the op does not read ids back to check them: the token with a bad id gets NaN."""
    args = list(moe_inputs(5, 4, 16, 8, 2, torch.float32, seeded("nan")))
    args[4][2, 1] = 7
    args[4][3, 0] = -1
    with cpu_kernels(True):
        out = fused_moe.triton_impl(*args, plan=plan)
    assert out[2].isnan().all() and out[3].isnan().all()
    good = [0, 1, 4]
    assert_moe_close(out[good], [args[0][good], *args[1:3], args[3][good], args[4][good]], 1e-5)


def test_fused_moe_bad_args_and_opcheck():
    x, w13, w2, w, ids = moe_inputs(4, 4, 16, 8, 2, torch.float32, seeded("bad"))
    op = torch.ops.kunlun.fused_moe
    with pytest.raises(ValueError, match="activation"):
        op(x, w13, w2, w, ids, "gelu")
    with pytest.raises(ValueError, match="don't add up"):
        op(x, w13, w2[:, :, :4], w, ids, "silu")
    with pytest.raises(ValueError, match="topk_ids"):
        op(x, w13, w2, w[:, :1], ids, "silu")
    with pytest.raises(ValueError, match="dtype"):
        op(x, w13.double(), w2, w, ids, "silu")
    torch.library.opcheck(op.default, (x, w13, w2, w, ids, "silu"))


# ---- gpt-oss's experts: biases and the clamped, interleaved SwiGLU ("swigluoai") -------------------------

OAI_ALPHA, OAI_LIMIT = 1.702, 1.5  # a low limit, so both clamps cut a good share of the values


def oai_inputs(M, E, H, I, k, dtype, gen):
    x, w13, w2, weights, ids = moe_inputs(M, E, H, I, k, dtype, gen)
    b13 = torch.randn(E, 2 * I, generator=gen).to(dtype)
    b2 = (torch.randn(E, H, generator=gen) / 4).to(dtype)
    return (x, w13, w2, weights, ids), (b13, b2)


def oai_float64(x, w13, w2, weights, ids, b13, b2, alpha=OAI_ALPHA, limit=OAI_LIMIT):
    """Written from gpt-oss's expert code, in float64, token by token."""
    x, w13, w2, weights, b13, b2 = (t.double() for t in (x, w13, w2, weights, b13, b2))
    out = torch.zeros_like(x)
    for m in range(x.shape[0]):
        for j, e in enumerate(ids[m].tolist()):
            h = w13[e] @ x[m] + b13[e]
            gate, up = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
            out[m] += weights[m, j] * (w2[e] @ ((up + 1) * gate * torch.sigmoid(gate * alpha)) + b2[e])
    return out


def _oai(fn, args, biases, **kw):
    return fn(*args, "swigluoai", b13=biases[0], b2=biases[1], alpha=OAI_ALPHA, limit=OAI_LIMIT, **kw)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan", FORCED_PLANS, ids=plan_id)
def test_fused_moe_swigluoai_with_biases_every_kernel_path(plan, dtype):
    args, biases = oai_inputs(37, 8, 48, 40, 3, dtype, seeded("oai", dtype, plan))
    want = oai_float64(*args, *biases)
    clamped = torch.stack([(args[1].double() @ args[0].double().T).abs() > OAI_LIMIT]).float().mean()
    assert 0.1 < clamped < 0.9  # the clamps are exercised
    with cpu_kernels(True):
        got = _oai(fused_moe.triton_impl, args, biases, plan=plan)
    assert not got.isnan().any()
    assert rel_err(got, want) < INTERPRETED_TOL[dtype], rel_err(got, want)
    ref = _oai(fused_moe.reference, args, biases)
    assert rel_err(ref, want) < MOE_TOL[dtype], rel_err(ref, want)


@needs_interpreter
@pytest.mark.parametrize("plan", [p for p in FORCED_PLANS if not p.tma], ids=plan_id)
def test_fused_moe_swigluoai_reads_k_major_weights_in_place(plan):
    """gpt-oss stores its weights [E, H, 2I] and [E, I, H]: through the transposed view, the same bits."""
    args, biases = oai_inputs(37, 8, 64, 32, 3, torch.bfloat16, seeded("oai k-major", plan))
    k_args = (args[0], k_major(args[1]), k_major(args[2]), *args[3:])
    with cpu_kernels(True):
        want = _oai(fused_moe.triton_impl, args, biases, plan=plan)
        got = _oai(fused_moe.triton_impl, k_args, biases, plan=plan)
    assert not want.isnan().any() and torch.equal(got, want)


@pytest.mark.parametrize("path", PATHS)
def test_fused_moe_op_takes_biases_and_swigluoai(path):
    args, biases = oai_inputs(5, 8, 32, 16, 2, torch.float32, seeded("oai op", path))
    with cpu_kernels(path == "triton"):
        got = _oai(torch.ops.kunlun.fused_moe, args, biases)
    assert rel_err(got, oai_float64(*args, *biases)) < 1e-5
    x, w13, w2, w, ids = args
    with pytest.raises(ValueError, match="b13 must be"):
        _oai(torch.ops.kunlun.fused_moe, args, (biases[0][:, :4], biases[1]))
    with pytest.raises(ValueError, match="b2 must be"):
        _oai(torch.ops.kunlun.fused_moe, args, (biases[0], biases[1].double()))
    with pytest.raises(ValueError, match="swigluoai needs alpha != 0 and limit > 0"):
        torch.ops.kunlun.fused_moe(x, w13, w2, w, ids, "swigluoai", *biases)  # its constants left out
    torch.library.opcheck(torch.ops.kunlun.fused_moe.default, (*args, "swigluoai", *biases, OAI_ALPHA, OAI_LIMIT))


# ---- kunlun::grouped_mm: the primitive the HF grouped-GEMM experts rule is written with ---------------

def test_grouped_mm_is_one_matmul_per_group_and_zero_past_the_last_offset():
    gen = torch.Generator().manual_seed(stable_seed("grouped_mm"))
    a, b = torch.randn(11, 6, generator=gen), torch.randn(4, 6, 5, generator=gen)
    offs = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # group 1 empty, rows 9-10 past the end
    got = torch.ops.kunlun.grouped_mm(a, b, offs)
    want = torch.zeros(11, 5, dtype=torch.float64)
    for g, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 7), (7, 9)]):
        want[lo:hi] = a[lo:hi].double() @ b[g].double()
    assert_close_to_float64(got, want, rtol=1e-6)
    assert torch.equal(got[9:], torch.zeros(2, 5))


def test_grouped_mm_matches_torch_grouped_mm_where_that_runs():
    gen = torch.Generator().manual_seed(stable_seed("grouped_mm_bf16"))
    a, b = torch.randn(16, 32, generator=gen).bfloat16(), torch.randn(3, 32, 16, generator=gen).bfloat16()
    offs = torch.tensor([5, 12, 16], dtype=torch.int32)
    try:
        want = torch._grouped_mm(a, b, offs=offs)
    except (RuntimeError, NotImplementedError) as e:  # no kernel for this device/dtype in this build
        pytest.skip(f"torch._grouped_mm does not run here: {e}")
    got = torch.ops.kunlun.grouped_mm(a, b, offs)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shapes, message", [
    (((4, 6), (2, 5, 3), (2,)), "a's K 6 != b's K 5"),
    (((4, 6), (2, 6, 3), (3,)), "offs must be int32/int64 [2]"),
    (((4, 6, 1), (2, 6, 3), (2,)), "a must be [rows, K]"),
])
def test_grouped_mm_rejects_bad_shapes_with_a_clear_error(shapes, message):
    a, b, offs = torch.randn(*shapes[0]), torch.randn(*shapes[1]), torch.zeros(*shapes[2], dtype=torch.int32)
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.kunlun.grouped_mm(a, b, offs)
