"""Row kernels: reductions lowered with their element-wise producers and consumers (lowering/).

Every case runs the lowered graph twice on fresh random inputs — through the KIR interpreter and
through the generated Triton kernel under Triton's interpreter — and compares with a float64 run of
the same function: the error may not exceed eager's own error by more than a few units of the
result type (the sums add in another order than eager's).  Rows longer than the persistent tile
take the looped form; NaN positions must be eager's.
"""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kunlun_compile.config import CompileConfig
from kunlun_compile.graph_stats import count_kernels, generated_kernels
from kunlun_compile.lowering.cache import kir_for
from kunlun_compile.lowering.row_kernel import PERSISTENT_MAX_R, tile_plan
from kunlun_compile.ops import cpu_kernels
from kunlun_compile.passes import PassContext
from kunlun_compile.passes.lower_elementwise import lower_elementwise

from .test_lowering import lower

F = torch.nn.functional


def rms_hf(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def rms_spelled(x, w):  # x*x, sum/n, 1/sqrt: another hand-written RMSNorm
    xf = x.float()
    return (xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) / x.shape[-1] + 1e-5) * (1.0 + w.float())).to(x.dtype)


def softmax_scaled_masked(x, w):
    return torch.softmax(x.float() * 0.125 + torch.where(w > 0, 0.0, -1e4), dim=-1).to(x.dtype)


def softmax_spelled(x, w):
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(-1, keepdim=True)


def log_softmax(x, w):
    return F.log_softmax(x, dim=-1)


def layer_norm_gelu_residual(x, w):
    return F.gelu(F.layer_norm(x, (x.shape[-1],), w, w * 0.5)) + x


def hand_layer_norm(x, w):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + 1e-5) * w


def var_mean_both(x, w):
    v, m = torch.var_mean(x, -1, keepdim=True)
    return (x - m) * v


def min_max_scale(x, w):
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    return (x - lo) / (hi - lo)


def router_probs(x, w):  # softmax in fp32 along dim=1 of [T, E], spelled as routers do
    return torch.softmax(x.float(), dim=1)


CASES = [rms_hf, rms_spelled, softmax_scaled_masked, softmax_spelled, log_softmax, layer_norm_gelu_residual,
         hand_layer_norm, var_mean_both, min_max_scale, router_probs]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ from eager's"
    finite = ~want.isnan()
    return ((got[finite].double() - want[finite].double()).abs().max() / want[finite].double().abs().max()).item()


def check_against_float64(fn, inputs, gm, units=4):
    ref = fn(*[x.double() for x in inputs])
    eager = fn(*inputs)
    eps = torch.finfo(eager.dtype).eps
    eager_err = relative_error(eager, ref.to(eager.dtype))
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            (got,) = gm(*inputs) if isinstance(gm(*inputs), (list, tuple)) else (gm(*inputs),)
        err = relative_error(got, ref.to(got.dtype))
        assert err <= eager_err + units * eps, (fn.__name__, interpreted, err, eager_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fn", CASES, ids=lambda f: f.__name__)
def test_reduction_and_its_neighbours_are_one_row_kernel(fn, dtype):
    g = torch.Generator().manual_seed(CASES.index(fn))
    x, w = torch.randn(6, 48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    gm, outcome = lower(fn, x, w)
    kernels = count_kernels(gm)
    assert kernels["aten"] == 0 and kernels["pointwise"] == 1, outcome.near_misses
    (key,) = generated_kernels(gm)
    assert kir_for(key).reduce_dim == 1
    check_against_float64(fn, (x, w), gm)


@pytest.mark.parametrize("fn", [rms_hf, softmax_spelled, log_softmax, hand_layer_norm, min_max_scale],
                         ids=lambda f: f.__name__)
def test_long_rows_take_the_looped_form(fn):
    n = PERSISTENT_MAX_R + 904
    assert not tile_plan(3, n)[0]
    x, w = torch.randn(3, n).bfloat16(), torch.randn(n).bfloat16()
    gm, outcome = lower(fn, x, w)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    check_against_float64(fn, (x, w), gm)


def test_any_dim_and_strided_inputs():
    """Reducing a middle dim (the MoE combine: sum over top-k of [T, k, H]) and reading a transposed input."""
    def combine(y, p):
        return (y * p[..., None]).sum(dim=1)

    y, p = torch.randn(5, 4, 24), torch.softmax(torch.randn(5, 4), -1)
    gm, outcome = lower(combine, y, p)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert kir_for(generated_kernels(gm)[0]).reduce_dim == 1
    check_against_float64(combine, (y, p), gm)
    xt = torch.randn(48, 6).t()  # [6, 48], stride (1, 6)
    gm, _ = lower(rms_hf, xt, torch.randn(48))
    check_against_float64(rms_hf, (xt, torch.randn(48)), gm)


def test_per_row_results_leave_the_kernel_with_or_without_the_dim():
    def stats(x):
        return x.sum(-1), x.amax(-1, keepdim=True), torch.softmax(x, -1)

    x = torch.randn(7, 40)
    gm, outcome = lower(stats, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    kir = kir_for(generated_kernels(gm)[0])
    assert len(kir.reduced_outputs) == 2 and "per row" in kir.listing()
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            for got, want in zip(gm(x), stats(x)):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.bool], ids=str)
def test_reductions_over_a_dim_of_size_one_are_conversions_in_the_element_wise_kernel(dtype):
    """transformers' packed-sequence cumsum at decode (one token) and other reductions over a dim of size 1:
    conversions to the result's dtype (bool/int sums count in int64), softmax exp(x - x), log-softmax x - x
    (NaN for an infinite x, as eager), squeezed where the dim is not kept; they join their neighbours' kernel
    (a row kernel of length 1 had stayed ATen, four more kernels on the GPU)."""
    def unit(x, y):
        outs = [x.cumsum(-1) + y, x.sum(1), x.sum([0, 1], keepdim=True), x.cumsum(0, dtype=torch.float32) * 2]
        if dtype is not torch.bool:
            outs += [x.amax(1, keepdim=True), x.amin([1]), x.prod(1)]
        if dtype.is_floating_point:
            outs += [x.mean(1) * 3, torch.softmax(x, 1), torch.log_softmax(x, -1),
                     torch.softmax(x, 0, dtype=torch.float32)]
        return outs

    g = torch.Generator().manual_seed(4)
    x = (torch.randn(1, 1, generator=g) * 4).to(dtype) if dtype is not torch.bool else torch.tensor([[True]])
    y = torch.randn(3, 1, generator=g) * 4
    gm, outcome = lower(unit, x, y)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    gm, _ = lower(lambda a, b: a.cumsum(-1) + b, x, y)  # the decode cumsum: one kernel with its reader
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}
    gm, _ = lower(unit, x, y)
    cases = [x] + ([torch.full((1, 1), v).to(dtype) for v in (float("nan"), float("inf"), -float("inf"))]
                   if dtype.is_floating_point else [])
    for case in cases:
        want = unit(case, y)
        for interpreted in (False, True):
            with cpu_kernels(interpreted):
                got = gm(case, y)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True
                assert torch.equal(a.nan_to_num(), b.nan_to_num()) if a.is_floating_point() else torch.equal(a, b)


def test_nan_propagates_as_in_eager():
    x = torch.randn(6, 5000)
    x[1, 7] = float("nan")  # looped form
    x[4, 4999] = float("nan")
    short = torch.randn(6, 40)
    short[2, 0] = float("nan")
    for inp in (x, short):
        for fn in (lambda t: t.amax(-1, keepdim=True) * 2, lambda t: torch.softmax(t, -1),
                   lambda t: t.amin(-1) + 1, lambda t: t.sum(-1)):
            gm, _ = lower(fn, inp)
            assert count_kernels(gm)["aten"] == 0
            want = fn(inp)
            for interpreted in (False, True):
                with cpu_kernels(interpreted):
                    got = gm(inp)
                assert torch.equal(got.isnan(), want.isnan())
                # sums of 5000 terms in another order: within fp32 rounding of the sum of magnitudes
                torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5,
                                           atol=1e-6 * inp.nan_to_num(0).abs().sum(-1).max().item())


def test_what_stays_aten_says_why():
    def f(x):
        return x.sum(dim=(0, 1)) + x.mean()  # two dims, all dims

    gm, outcome = lower(f, torch.randn(4, 6, 8))
    text = "\n".join(outcome.near_misses)
    assert "reduces 2 dims" in text and "reduces 3 dims" in text

    def symbolic(x):  # over the token dim, symbolic under dynamic shapes: the row's length is a runtime value
        return torch.softmax(x, 0), x.var(0), x.mean(0, keepdim=True)

    gm = make_fx(symbolic, tracing_mode="symbolic")(torch.randn(6, 8))
    outcome = lower_elementwise(gm, PassContext(CompileConfig(), "t"))
    gm.recompile()
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    for t in (6, 3, 1, 0):
        x = torch.randn(t, 8)
        for interpreted in (False, True):
            with cpu_kernels(interpreted):
                for got, want in zip(gm(x), symbolic(x)):
                    torch.testing.assert_close(got, want, equal_nan=True)


def test_a_dropped_per_row_value_never_broadcasts_along_the_wrong_dim():
    """[T] against [T, T]: torch broadcasts it along dim 0 (by column), not per row.  The kernel must not
    treat it as the per-row value."""
    def f(x):
        return x * x.sum(-1)

    x = torch.randn(6, 6)
    gm, _ = lower(f, x)
    torch.testing.assert_close(gm(x), f(x))
    with cpu_kernels(True):
        torch.testing.assert_close(gm(x), f(x))


def test_compiled_model_keeps_only_matmuls_and_attention_as_aten_with_fusion_off():
    import kunlun_compile as kc  # noqa: F401 - registers the backend

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(32)
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            h = self.fc(self.ln(x))
            return x + F.gelu(h) * torch.softmax(h, -1)

    m, x = Block(), torch.randn(5, 32)
    compiled = torch.compile(m, backend="kunlun", options={"fusion": False, "strict": True})
    torch.testing.assert_close(compiled(x), m(x))


def extremes(x):
    return x.argmax(-1), x.argmin(1, keepdim=True), torch.max(x, -1), torch.min(x, 1, keepdim=True)


@pytest.mark.parametrize("case", ["float", "ties", "long_row", "int"])
def test_argmax_argmin_and_max_dim_are_eagers_first_occurrence(case):
    """The least position holding the extreme (eager: the first occurrence); a NaN is the extreme (eager's
    rule), so a row with NaN answers its first NaN; a row of -inf answers 0."""
    g = torch.Generator().manual_seed(3)
    x = {"float": lambda: torch.randn(5, 37, generator=g),
         "ties": lambda: torch.randint(-3, 3, (4, 50), generator=g).float(),
         "long_row": lambda: torch.randn(3, PERSISTENT_MAX_R + 904, generator=g),
         "int": lambda: torch.randint(-5, 5, (4, 9), generator=g)}[case]()
    if x.is_floating_point():
        x[1, 7] = x[1, 20] = float("nan")
        x[2, :] = float("-inf")
    gm, outcome = lower(extremes, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    want = torch.utils._pytree.tree_leaves(extremes(x))
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = torch.utils._pytree.tree_leaves(gm(x))
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b) if not a.is_floating_point() else torch.equal(a.isnan(), b.isnan()) and \
                torch.equal(a.nan_to_num(), b.nan_to_num())


def test_one_compile_serves_every_token_count():
    """Symbolic token counts through the backend: one row kernel, per-row outputs without their dim, every size."""
    import kunlun_compile as kc

    def f(x, w):
        return rms_hf(x, w), torch.softmax(x.float(), -1).amax(-1), x.argmax(-1)

    w = torch.randn(48)
    compiled = kc.compile(f, dynamic=True, fusion=False, strict=True, graph_mode="none")
    for t in (3, 5, 9, 1):
        x = torch.randn(t, 48)
        got, want = compiled(x, w), f(x, w)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    (graph,) = compiled.kunlun_backend.report.graphs
    assert graph.kernels["aten"] == 0 and graph.kernels["pointwise"] >= 1


@pytest.mark.parametrize("fn", [lambda t: torch.softmax(t, -1), lambda t: F.log_softmax(t, -1),
                                lambda t: softmax_spelled(t.float(), None), lambda t: softmax_spelled(t, None)],
                         ids=["softmax", "log_softmax", "spelled_fp32", "spelled_bf16"])
def test_long_softmax_rows_of_infinities_and_nan_are_eagers(fn):
    """The looped form (three passes over the row) on rows of -inf, +inf, NaN, a single finite value
    among -inf (in the last tile) and all -inf: NaN and inf positions as eager's, values within eager's
    error against float64."""
    n = PERSISTENT_MAX_R + 904
    x = (torch.randn(9, n) * 4).bfloat16()
    x[1, 3] = float("nan")
    x[2, n - 1] = float("inf")
    x[3, :] = float("-inf")
    x[4, :] = float("-inf")
    x[4, n - 5] = 2.0  # the only finite value, in the last tile: every earlier lane held -inf
    x[5, : n // 2] = float("-inf")
    x[6, 100] = float("-inf")
    x[7, :] = float("inf")
    assert not tile_plan(9, n)[0]
    gm, outcome = lower(fn, x)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    want = fn(x)
    ref = fn(x.double()).to(want.dtype)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(x)
        assert torch.equal(got.isnan(), want.isnan()), interpreted
        assert torch.equal(got.isinf(), want.isinf()), interpreted
        finite = want.isfinite()
        err = (got[finite].double() - ref[finite].double()).abs().max()
        eager_err = (want[finite].double() - ref[finite].double()).abs().max()
        assert err <= eager_err + 4 * torch.finfo(got.dtype).eps * ref[finite].double().abs().max(), interpreted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [48, PERSISTENT_MAX_R + 904], ids=["persistent", "looped"])
def test_cumsum_is_a_scan_in_a_row_kernel(n, dtype):
    """cumsum along a row (and along a column: dim 0) with its neighbours in one row kernel: fp32 accumulation
    for half results as eager's, integer prefix sums exact, NaN positions as eager's."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g).to(dtype)
    x[2, n // 2] = float("nan")
    cases = [(lambda t: torch.cumsum(t, -1) * 0.5, x), (lambda t: (t > 0).cumsum(-1) - 1, x),
             (lambda t: torch.cumsum(t.float() + 1.0, 0), x.t().contiguous())]
    for fn, inp in cases:
        gm, outcome = lower(fn, inp)
        assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
        (key,) = generated_kernels(gm)
        assert "scan.sum" in kir_for(key).listing()
        want, ref = fn(inp), fn(inp.double()) if inp.is_floating_point() else None
        for interpreted in (False, True):
            with cpu_kernels(interpreted):
                got = gm(inp)
            assert got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan())
            if not want.is_floating_point():
                assert torch.equal(got, want)
                continue
            ok = ~want.isnan()
            # prefix sums in another order: within eager's own error + a few units of the running magnitude
            scale = inp.double().abs().nan_to_num().sum()
            err = (got[ok].double() - ref.to(got.dtype)[ok].double()).abs().max()
            eager_err = (want[ok].double() - ref.to(got.dtype)[ok].double()).abs().max()
            assert err <= eager_err + 4 * torch.finfo(got.dtype).eps * scale, (interpreted, err, eager_err)


def moe_counts(ids):  # tokens per expert (their running sum is counted directly: test_lowering_sorts.py)
    return torch.histc(ids.float(), bins=8, min=0, max=7).to(torch.int32)


@pytest.mark.parametrize("fn, make", [
    (moe_counts, lambda g: torch.randint(0, 9, (300,), generator=g)),  # 8 is past max: in no bin
    (lambda x: torch.histc(x, bins=10, min=-1.5, max=2.0) * 2, lambda g: torch.randn(9000, generator=g)),
    (lambda x: torch.histc(x, bins=3, min=-2, max=2), lambda g: torch.randint(-4, 5, (77,), generator=g).double()),
], ids=["moe_counts", "float_looped", "edges"])
def test_histc_is_a_row_kernel_with_a_row_per_bin(fn, make):
    """histc: bins x elements, one row per bin (`row.point`), counts exact; an element equal to max falls in
    the last bin, NaN and out-of-range ones in none, as eager's."""
    x = make(torch.Generator().manual_seed(0))
    if x.is_floating_point():
        x[3] = float("nan")
        x[4] = float("inf")
    gm, outcome = lower(fn, x)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    assert "row.point" in "\n".join(kir_for(k).listing() for k in generated_kernels(gm))
    want = fn(x)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(x)
        assert got.dtype == want.dtype and torch.equal(got, want), interpreted


def test_histc_that_takes_its_range_from_the_data_stays_aten_and_says_why():
    gm, outcome = lower(lambda x: torch.histc(x, bins=4), torch.randn(20))
    assert count_kernels(gm)["aten"] == 1
    assert any("taken from the data" in m for m in outcome.near_misses), outcome.near_misses


def test_histc_reads_bins_and_range_given_by_name():
    """A graph may carry histc's bins/min/max as keywords: the row space and the bins' arithmetic both read
    them (integer inputs are eager's on CUDA only; on the CPU tracing itself raises, as eager does)."""
    x = torch.randint(0, 8, (40,)).float()
    gm = make_fx(lambda t: torch.histc(t, bins=8, min=0, max=7), tracing_mode="fake")(x)
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.histc.default]
    node.args, node.kwargs = node.args[:1], {"bins": 8, "min": 0, "max": 7}
    lower_elementwise(gm, PassContext(CompileConfig(), "t"))
    gm.recompile()
    assert count_kernels(gm)["aten"] == 0
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(x), torch.histc(x, bins=8, min=0, max=7))


# ---- row kernels that index: gathers, views and `cat` around a reduction (reindex.py) ----------------

def embed_then_norm(ids, table, w):  # HF: the embedding's rows are the residual and the first norm's input
    e = F.embedding(ids, table)
    return rms_hf(e, w), e


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qk_norm_rope(q, k, wq, wk, cos, sin):
    """Qwen3's attention prologue without fusions: per-head norms of [B, S, H, D], the head transpose, the
    rotation by rotate_half, and k repeated for grouped queries (`repeat_kv`)."""
    q, k = rms_hf(q, wq).transpose(1, 2), rms_hf(k, wk).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    b, h, s, d = k.shape
    return q, k[:, :, None].expand(b, h, 2, s, d).reshape(b, 2 * h, s, d)


def packed_sequence_starts(pos):  # transformers' packed-sequence detection
    return (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)


def assert_close_to_float64(fn, inputs, outputs, units=4):
    refs = fn(*[x.double() if x.is_floating_point() else x for x in inputs])
    for got, want, ref in zip(outputs, fn(*inputs), refs):
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype
        eps = torch.finfo(got.dtype).eps
        assert relative_error(got, ref.to(got.dtype)) <= relative_error(want, ref.to(want.dtype)) + units * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [48, PERSISTENT_MAX_R + 904], ids=["persistent", "looped"])
def test_an_embedding_gather_joins_the_norm_that_reads_it(hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    ids = torch.randint(0, 30, (2, 7), generator=g)
    table, w = torch.randn(30, hidden, generator=g).to(dtype), torch.randn(hidden, generator=g).to(dtype)
    gm, outcome = lower(embed_then_norm, ids, table, w)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    kir = kir_for(generated_kernels(gm)[0])
    assert kir.reduce_dim == 2 and "gather" in kir.listing()
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            normed, rows = gm(ids, table, w)
        assert torch.equal(rows, table[ids])
        assert_close_to_float64(embed_then_norm, (ids, table, w), (normed, rows))
    with pytest.raises(IndexError):  # an id outside the table: eager's error, checked on the host
        gm(torch.full((2, 7), 30), table, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qk_norms_through_the_head_transpose_and_rotation_are_one_row_kernel_each(dtype):
    """The norm's rows are read at the rotation's other half (same row, other positions) and through the head
    transpose: each of q and k is one row kernel; q keeps eager's transposed layout, k's repeat is written out."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 5, 4, 16, generator=g).to(dtype), torch.randn(2, 5, 2, 16, generator=g).to(dtype)
    wq, wk = torch.randn(16, generator=g).to(dtype), torch.randn(16, generator=g).to(dtype)
    cos, sin = (torch.randn(2, 5, 16, generator=g).to(dtype) for _ in range(2))
    args = (q, k, wq, wk, cos, sin)
    gm, outcome = lower(qk_norm_rope, *args)
    keys = generated_kernels(gm)
    assert len(keys) == 2 and all(kir_for(key).reduce_dim is not None for key in keys), outcome.near_misses
    assert "dims [0, 2, 1, 3] in memory" in kir_for(keys[0]).listing()
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert_close_to_float64(qk_norm_rope, args, gm(*args))


def test_positions_and_their_running_count_are_one_row_kernel():
    """transformers' packed-sequence starts from position ids made by `arange` in the graph (no input read):
    the diff, the compare and the cumsum are one row kernel; counts are exact."""
    def from_arange(n):
        pos = (torch.arange(12) + n)[None]
        return pos, packed_sequence_starts(pos)

    gm, outcome = lower(from_arange, torch.tensor(3))
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    pos = torch.cat([torch.arange(5), torch.arange(3), torch.arange(6)])[None]
    gm, outcome = lower(packed_sequence_starts, pos)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(pos), packed_sequence_starts(pos))


@pytest.mark.parametrize("fn", [
    lambda x: x.exp().sum(-1)[1:] - x.exp().sum(-1)[:-1],  # row sums read at the next row
    lambda x: torch.cat([x.cumsum(-1)[:, 1:], x.cumsum(-1)[:, :1]], -1),  # a scan read at other positions
    lambda x: torch.softmax(x, -1).t() * 2,  # rows read down the columns
], ids=["next_row", "rolled_scan", "columns"])
def test_a_row_read_at_other_rows_or_positions_crosses_memory(fn):
    """A reduction read at rows other than the kernel's own (or a scan at other positions) cannot be one kernel:
    the values go through memory, no cluster is refused, results are eager's."""
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    gm, outcome = lower(fn, x)
    assert count_kernels(gm)["aten"] == 0 and len(generated_kernels(gm)) >= 2, outcome.near_misses
    assert not [m for m in outcome.near_misses if m.startswith("cluster at")], outcome.near_misses
    scale = x.exp().sum(-1).max().item()  # sums in another order than eager's: within fp32 units of the sums
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            torch.testing.assert_close(gm(x), fn(x), rtol=1e-5, atol=1e-6 * scale)


def test_a_gather_by_negative_ids_joins_its_softmax():
    def f(x, ids):
        return torch.softmax(x[ids] * 0.5, dim=-1)

    x, ids = torch.randn(10, 40), torch.tensor([0, -1, 3, -10, 9])
    gm, outcome = lower(f, x, ids)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            torch.testing.assert_close(gm(x, ids), f(x, ids))


def test_safe_softmax_gives_zero_rows_where_attention_sees_nothing():
    """SDPA's math path (DeepSeek's eager attention) normalises with `_safe_softmax`: a row that is -inf
    everywhere is 0, not NaN; a NaN still makes its row NaN."""
    def f(s):
        return torch.ops.aten._safe_softmax(s, -1)

    s = torch.randn(2, 3, 7, 7)
    s = s.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    s[0, 1, 3] = float("-inf")  # a row that sees nothing
    s[1, 2, 4, 0] = float("nan")
    gm, outcome = lower(f, s)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    want = f(s)
    assert torch.equal(want[0, 1, 3], torch.zeros(7))
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            torch.testing.assert_close(gm(s), want, equal_nan=True)
