"""Generated element-wise kernels on the GPU (skipped without CUDA).

On CUDA the precise forms call libdevice, the library eager torch's CUDA
kernels use, and the lowering evaluates each op in torch's order: fp32 results
must match eager to the last unit almost everywhere.  bf16/fp16 results take
the approximate SFU instructions (inline PTX) where the policy allows: they
must stay within one unit of eager's result.
"""
from __future__ import annotations

import pytest
import torch

from torch.fx.experimental.proxy_tensor import make_fx

from kunlun_compile.config import CompileConfig
from kunlun_compile.graph_stats import count_kernels
from kunlun_compile.passes import PassContext
from kunlun_compile.passes.lower_elementwise import lower_elementwise
from kunlun_compile.lowering.cache import kernel_for, source_path

from .test_lowering_properties import EVERY_OP, lowered, scale_of

pytestmark = pytest.mark.gpu


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 2).to(getattr(torch, dtype)).cuda() for s in [(64, 257), (257,)]]


def _units(got, want, dtype):
    """Per-element difference in units of the result dtype at eager's value."""
    eps = torch.finfo(getattr(torch, dtype)).eps
    w = want.double()
    return ((got.double() - w).abs() / (w.abs().clamp_min(torch.finfo(getattr(torch, dtype)).tiny) * eps))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("program", EVERY_OP, ids=lambda p: "-".join(step[1] or step[0] for step in p))
def test_every_op_on_cuda_matches_eager(program, dtype):
    inputs = _inputs(dtype, seed=len(program))
    gm, fn, outcome = lowered(program, inputs)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    want = fn(*inputs)
    got = gm(*inputs)
    scale = scale_of(program, [x.cpu() for x in inputs])
    eps = torch.finfo(getattr(torch, dtype)).eps
    for g, w in zip(got, want):
        if w.dtype == torch.bool:
            assert (g != w).float().mean().item() <= 0.01
            continue
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        # fp32: one unit (precise forms ~ libdevice); bf16/fp16: one unit (approximate SFU forms)
        torch.testing.assert_close(g.double(), w.double(), rtol=1.01 * eps, atol=eps * scale, equal_nan=True)


def test_bf16_silu_mul_uses_sfu_instructions_and_stays_within_one_unit():
    x = torch.randn(4096, 2 * 1024, device="cuda", dtype=torch.bfloat16) * 4

    def fn(t):
        a, b = t.chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b

    gm = make_fx(fn, tracing_mode="fake")(x)
    assert lower_elementwise(gm, PassContext(CompileConfig(), "t")).matches == 1
    gm.recompile()
    key = [n.args[2] for n in gm.graph.nodes if "pointwise" in str(n.target)][0]
    got, want = gm(x), fn(x)
    src = source_path(key).read_text()
    assert "ex2.approx.f32" in src and "rcp.approx.f32" in src
    units = _units(got, want, "bfloat16")
    assert units.max().item() <= 1.0 + 1e-6
    share_exact = (got == want).float().mean().item()
    assert share_exact > 0.97, share_exact  # the approximation flips a rounding only near a tie
    assert kernel_for(key).kir.count("sfu") == 2


def test_symbolic_kernel_serves_every_size_on_cuda():
    import kunlun_compile as kc

    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(approximate="tanh")).cuda().half()
    compiled = kc.compile(m, dynamic=True, strict=True, graph_mode="none")
    with torch.no_grad():
        for n in (1, 7, 300, 4097):
            x = torch.randn(n, 64, device="cuda", dtype=torch.half)
            torch.testing.assert_close(compiled(x), m(x), rtol=2e-3, atol=2e-3)
    report = compiled.kunlun_backend.report
    assert len(report.graphs) == 1 and report.graphs[0].kernels["pointwise"] == 1


# ---- row kernels (a reduction with its producers and consumers) on CUDA -----------------------------

ROW_SIZES = [(1, 4096), (64, 4096), (4096, 2048), (7, 151), (3, 32000)]  # decode, prefill, odd, looped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", ROW_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_row_kernels_on_cuda_match_float64_as_well_as_eager(size, dtype):
    """Each case as one row kernel (persistent or looped by the row length): its error against float64 is
    eager's own error plus a few units of the result type (the sum's addition order differs)."""
    from .test_lowering_reductions import CASES, lower, relative_error

    g = torch.Generator().manual_seed(size[0] * 7 + size[1])
    x = torch.randn(size, generator=g).to(dtype).cuda()
    w = torch.randn(size[1], generator=g).to(dtype).cuda()
    if size[0] > 1:
        x[0, size[1] // 3] = float("nan")  # one NaN row: its position must be eager's
    eps = torch.finfo(dtype).eps
    for fn in CASES:
        gm, outcome = lower(fn, x, w)
        assert count_kernels(gm)["aten"] == 0, (fn.__name__, outcome.near_misses)
        ref = fn(x.double(), w.double())
        eager, got = fn(x, w), gm(x, w)
        err, eager_err = relative_error(got, ref.to(got.dtype)), relative_error(eager, ref.to(eager.dtype))
        assert err <= eager_err + 4 * eps, (fn.__name__, err, eager_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_indexed_kernels_on_cuda_match_eager(dtype):
    """Views, cat, gathers and arange inside generated kernels (tests/test_lowering_indexing.py's cases) on
    CUDA: one kernel each, eager's values (bf16 within one unit where the SFU forms are taken)."""
    from .test_lowering_indexing import CASES
    from .test_lowering_reductions import lower

    for k, (fn, make) in enumerate(CASES):
        torch.manual_seed(k)
        args = [(a.to(dtype) if a.is_floating_point() else a).cuda() for a in make()]
        gm, outcome = lower(fn, *args)
        assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, (fn.__name__, outcome.near_misses)
        got, want = gm(*args), fn(*args)
        assert got.stride() == want.stride(), fn.__name__
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=eps if dtype == torch.bfloat16 else 0, atol=0, equal_nan=True,
                                   msg=lambda m, name=fn.__name__: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens, hidden", [(7, 48), (300, 2048), (5, 4096 + 904)], ids=str)
def test_row_kernels_that_index_on_cuda(tokens, hidden, dtype):
    """An embedding gather in its norm's row kernel (persistent and looped), the Q/K norms through the head
    transpose and rotation (q written in eager's transposed layout), packed-sequence starts: eager's values."""
    from .test_lowering_reductions import (assert_close_to_float64, embed_then_norm, lower, packed_sequence_starts,
                                           qk_norm_rope)

    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 100, (2, tokens), generator=g).cuda()
    table, w = (torch.randn(*s, generator=g).to(dtype).cuda() for s in [(100, hidden), (hidden,)])
    gm, outcome = lower(embed_then_norm, ids, table, w)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    normed, rows = gm(ids, table, w)
    assert torch.equal(rows, table[ids])
    assert_close_to_float64(embed_then_norm, (ids, table, w), (normed, rows))
    q, k = (torch.randn(2, tokens, h, 128, generator=g).to(dtype).cuda() for h in (8, 2))
    wq, wk = (torch.randn(128, generator=g).to(dtype).cuda() for _ in range(2))
    cos, sin = (torch.randn(2, tokens, 128, generator=g).to(dtype).cuda() for _ in range(2))
    args = (q, k, wq, wk, cos, sin)
    gm, outcome = lower(qk_norm_rope, *args)
    assert count_kernels(gm)["pointwise"] == 2, outcome.near_misses
    assert_close_to_float64(qk_norm_rope, args, gm(*args))
    pos = torch.cat([torch.arange(tokens // 2 + 1), torch.arange(tokens)])[None].cuda()
    gm, outcome = lower(packed_sequence_starts, pos)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert torch.equal(gm(pos), packed_sequence_starts(pos))


@pytest.mark.parametrize("size", [(7, 151), (64, 4096), (3, 32000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_argmax_and_max_dim_on_cuda_are_eagers(size):
    from .test_lowering_reductions import extremes, lower

    x = torch.randint(-4, 4, size, device="cuda").float()  # ties everywhere: the first occurrence must win
    x[0, size[1] // 2] = float("nan")
    gm, outcome = lower(extremes, x)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    for a, b in zip(torch.utils._pytree.tree_leaves(gm(x)), torch.utils._pytree.tree_leaves(extremes(x))):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def test_long_softmax_rows_of_infinities_and_nan_on_cuda():
    """The looped softmax/log_softmax on CUDA (16 warps, several loop trips): the CPU test's rows of -inf,
    +inf, NaN and a lone finite value, with values and NaN/inf positions as eager's."""
    import torch.nn.functional as F

    from .test_lowering_reductions import PERSISTENT_MAX_R, lower, softmax_spelled

    n = PERSISTENT_MAX_R * 8 - 3  # several loop trips
    x = (torch.randn(9, n) * 4).bfloat16()
    x[1, 3] = float("nan")
    x[2, n - 1] = float("inf")
    x[3, :] = float("-inf")
    x[4, :] = float("-inf")
    x[4, n - 5] = 2.0
    x[5, : n // 2] = float("-inf")
    x[7, :] = float("inf")
    x = x.cuda()
    for fn in (lambda t: torch.softmax(t, -1), lambda t: F.log_softmax(t.float(), -1),
               lambda t: softmax_spelled(t.float(), None)):
        gm, outcome = lower(fn, x)
        assert count_kernels(gm)["aten"] == 0, outcome.near_misses
        got, want, ref = gm(x), fn(x), fn(x.double())
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        ref = ref.to(want.dtype)[finite].double()
        err = (got[finite].double() - ref).abs().max()
        eager_err = (want[finite].double() - ref).abs().max()
        assert err <= eager_err + 4 * torch.finfo(got.dtype).eps * ref.abs().max()


def test_coordinates_are_exact_up_to_the_int32_limit():
    """Flat indices split into coordinates by a prime size right below 2**31 elements: a 2-D mask kernel over
    [32769, 65521] (2,147,024,897 elements, int32 indices) equals eager everywhere."""
    from .test_lowering_reductions import lower

    def mask(q, k):
        return k[None, :] <= q[:, None]

    q = torch.randint(0, 65521, (32769,), device="cuda")
    k = torch.arange(65521, device="cuda")
    gm, outcome = lower(mask, q, k)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    got = gm(q, k)
    assert got.numel() < 2**31 - 1 and torch.equal(got, mask(q, k))


@pytest.mark.parametrize("n", [48, 9000], ids=["persistent", "looped"])
def test_cumsum_scan_on_cuda(n):
    """scan.sum on CUDA: integer prefix sums exact (HF's packed-sequence ids), float ones within eager's error
    plus a few units of the row's magnitude; along a row and along a column."""
    x = torch.randn(5, n, device="cuda")
    for fn, inp in ((lambda t: (t > 0).cumsum(-1) - 1, x), (lambda t: torch.cumsum(t, -1) * 0.5, x),
                    (lambda t: torch.cumsum(t.bfloat16().float(), 0), x.t().contiguous())):
        from .test_lowering_reductions import lower

        gm, outcome = lower(fn, inp)
        assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
        got, want = gm(inp), fn(inp)
        if not want.is_floating_point():
            assert torch.equal(got, want)
            continue
        ref = fn(inp.double())
        err, eager_err = (got.double() - ref).abs().max(), (want.double() - ref).abs().max()
        assert err <= eager_err + 4 * torch.finfo(torch.float32).eps * inp.abs().double().sum()


def test_packed_sequence_mask_on_cuda():
    from .test_lowering_indexing import packed_mask
    from .test_lowering_reductions import lower

    pos = torch.cat([torch.arange(700), torch.arange(300)])[None].repeat(2, 1).cuda()
    pm = torch.rand(2, 1000, device="cuda") > 0.1
    gm, outcome = lower(packed_mask, pos, pm)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    assert torch.equal(gm(pos, pm), packed_mask(pos, pm))


def test_histc_on_cuda():
    """transformers' dispatch histogram on CUDA (int32 ids, as it calls it there): exact counts per expert."""
    from .test_lowering_reductions import lower

    ids = torch.randint(0, 129, (65536,), device="cuda", dtype=torch.int32)  # 128 is past max: in no bin

    def offsets(t):
        return torch.cumsum(torch.histc(t, bins=128, min=0, max=127), dim=0, dtype=torch.int32)

    gm, outcome = lower(offsets, ids)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    assert torch.equal(gm(ids), offsets(ids))


def test_scatter_store_on_cuda():
    """out[ids] = values into a fresh tensor on CUDA (store.at): transformers' inverse permutation and rows
    written at negative ids, exact."""
    from .test_lowering_indexing import inverse_permutation, scatter_rows
    from .test_lowering_reductions import lower

    x, ids = torch.randn(65536, 8, device="cuda"), torch.randint(0, 128, (65536,), device="cuda")
    gm, outcome = lower(inverse_permutation, x, ids)
    assert count_kernels(gm)["pointwise"] == 2, outcome.near_misses
    assert torch.equal(gm(x, ids), inverse_permutation(x, ids))
    perm = torch.randperm(4096, device="cuda") - 2048
    y = torch.randn(4096, 256, device="cuda")
    gm, outcome = lower(scatter_rows, y, perm)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert torch.equal(gm(y, perm), scatter_rows(y, perm))


def test_moe_dispatch_glue_on_cuda_in_a_graph_capture():
    """Ranked sorts and running counts on CUDA, captured in a CUDA graph and replayed with new ids (the first
    form made a 0-dim constant on the CPU: a host copy during capture, found by bench_lowering), exact;
    a float sort with ties and NaN in torch's stable order."""
    from torch.func import functionalize

    from .test_lowering_sorts import _same, _with_ties_and_nans, dispatch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 8, (64, 8), generator=g).cuda()
    x = torch.randn(64, 256, generator=g).cuda()
    gm = make_fx(functionalize(dispatch), tracing_mode="fake")(ids, x)
    outcome = lower_elementwise(gm, PassContext(CompileConfig.from_options({}), "t"))
    gm.recompile()
    assert count_kernels(gm) == {"fused": 0, "pointwise": 4, "aten": 0}, outcome.near_misses
    gm(ids, x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = gm(ids, x)
    for fresh in (torch.randint(0, 8, (64, 8), generator=g), torch.full((64, 8), 5)):
        ids.copy_(fresh.cuda())
        graph.replay()
        assert all(_same(a, b) for a, b in zip(outs, dispatch(ids, x)))
    v = _with_ties_and_nans(torch.float32, 300, g).cuda()
    sorted_gm = make_fx(lambda t: torch.sort(t, descending=True), tracing_mode="fake")(v)
    lower_elementwise(sorted_gm, PassContext(CompileConfig.from_options({}), "t"))
    sorted_gm.recompile()
    want = torch.sort(v, descending=True, stable=True)
    got = sorted_gm(v)
    assert _same(got[0], want.values) and _same(got[1], want.indices)
