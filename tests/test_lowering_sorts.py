"""Short sorts as ranks (lowering/small_sorts.py) and cumsum(histc) as one count (lowering/cumulative_counts.py):
the MoE dispatch glue of transformers' grouped-GEMM experts, in generated kernels at decode sizes."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kunlun_compile as kc
from kunlun_compile.graph_stats import count_kernels
from kunlun_compile.lowering.small_sorts import MAX_RANKED, sorts_as_ranks
from kunlun_compile.ops import cpu_kernels

from .test_lowering import lower


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.is_floating_point():
        return torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    return torch.equal(got, want)


def _with_ties_and_nans(dtype, n: int, g) -> torch.Tensor:
    x = torch.randint(-3, 4, (n,), generator=g).to(dtype)  # many ties
    if dtype.is_floating_point:
        x[torch.randperm(n, generator=g)[:3]] = float("nan")
        x[1], x[2] = -0.0, 0.0  # equal: kept in order
        x[4] = float("-inf")
    return x


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("descending", [False, True])
def test_a_short_sort_is_a_rank_kernel_and_a_scatter_with_the_stable_order(dtype, descending):
    """Values and positions are torch.sort(stable=True)'s (ties in order, NaN largest, -0.0 == 0.0), for a
    sort that does not promise stability too (its order is one of the valid ones)."""
    def f(x):
        s = torch.sort(x, descending=descending)
        return s.values, s.indices

    def g_(x):
        return torch.argsort(x, descending=descending, stable=True)

    g = torch.Generator().manual_seed(3)
    x = _with_ties_and_nans(dtype, 40, g)
    gm, outcome = lower(f, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}, outcome.near_misses
    by_position, _ = lower(g_, x)
    assert count_kernels(by_position)["aten"] == 0
    for case in (x, _with_ties_and_nans(dtype, 40, g)):
        want = torch.sort(case, stable=True, descending=descending)
        for interpreted in (False, True):
            with cpu_kernels(interpreted):
                values, indices = gm(case)
                again = by_position(case)
            assert _same(values, want.values) and _same(indices, want.indices) and _same(again, want.indices)


def test_long_and_symbolic_sorts_stay_aten():
    x = torch.randn(MAX_RANKED + 1)
    gm, _ = lower(lambda a: torch.sort(a)[1], x)
    assert count_kernels(gm)["aten"] == 1  # n^2 work past MAX_RANKED: ATen's sort
    torch._dynamo.reset()
    be = kc.backend(fusion=False)
    compiled = torch.compile(lambda a: torch.sort(a, stable=True)[1] * 2, backend=be, dynamic=True)
    for n in (5, 9, 30):
        a = torch.randint(0, 4, (n,))
        assert torch.equal(compiled(a), torch.sort(a, stable=True)[1] * 2)
    code = "\n".join(g.passes[-1].code_after for g in be.report.graphs)
    assert "aten.sort" in code  # a symbolic length has no bound


def dispatch(ids, x):
    """transformers' grouped-GEMM dispatch (sort by expert, tokens per expert and their offsets, rows in expert
    order, the inverse permutation, the rows gathered back): the bench's case, one spelling for both."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_lowering import moe_dispatch  # 64 experts: the tests' ids stay below 8

    return moe_dispatch(ids, x)


def test_moe_dispatch_glue_is_four_kernels_and_eager_exactly():
    """Ranks (1), sorted values and positions (1), the running counts with their conversion (1: cumsum(histc)
    counted directly), the gather (1); the inverse permutation is the rank itself (was 4 generated kernels
    and ATen's sort: 9 CUDA kernels, inductor 5)."""
    from torch.func import functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from kunlun_compile.config import CompileConfig
    from kunlun_compile.passes import PassContext
    from kunlun_compile.passes.lower_elementwise import lower_elementwise

    g = torch.Generator().manual_seed(5)
    ids, x = torch.randint(0, 8, (6, 2), generator=g), torch.randn(6, 16, generator=g)
    gm = make_fx(functionalize(dispatch), tracing_mode="fake")(ids, x)
    outcome = lower_elementwise(gm, PassContext(CompileConfig.from_options({}), "t"))
    gm.recompile()
    counted = count_kernels(gm)
    assert counted == {"fused": 0, "pointwise": 4, "aten": 0}, (counted, outcome.near_misses)
    for ids_case in (ids, torch.randint(0, 8, (6, 2), generator=g), torch.full((6, 2), 3)):
        want = dispatch(ids_case, x)
        for interpreted in (False, True):
            with cpu_kernels(interpreted):
                got = gm(ids_case, x)
            assert all(_same(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("out_dtype", [None, torch.int32, torch.int64])
def test_cumsum_of_a_histogram_is_one_counting_kernel(out_dtype):
    """Elements below min, above max, at max (the last bin), NaN (no bin): eager's counts, summed."""
    def running(x):
        return torch.histc(x, bins=6, min=-1.5, max=2.5).cumsum(0, dtype=out_dtype)

    g = torch.Generator().manual_seed(8)
    x = torch.randn(50, generator=g) * 2
    x[:4] = torch.tensor([2.5, -1.5, float("nan"), 7.0])
    gm, outcome = lower(running, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert _same(gm(x), running(x))


def test_sorted_values_read_by_several_kernels_are_written_once():
    """GptOss reads its sorted ids in three kernels: the scatter that writes them is not recomputed in each
    reader (a copy would write into a shared fresh tensor, refused, and stay ATen)."""
    def readers(ids, x):
        s = torch.sort(ids)
        return s.values[:, None] * 2 + x, s.values.float() * 3 - 1, s.values[None, :] - x.t()

    g = torch.Generator().manual_seed(2)
    ids, x = torch.randint(0, 6, (12,), generator=g), torch.randn(12, 3, generator=g)
    gm, outcome = lower(readers, ids, x)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert all(_same(a, b) for a, b in zip(gm(ids, x), readers(ids, x)))


def test_writes_that_are_not_the_inverse_permutation_stay_writes():
    """Only `inv[perm] = arange(n)` into a fresh [n] tensor, without accumulation, is the rank.  Into a longer
    fresh buffer (its tail is eager's uninitialised memory), or accumulated, the write stays a write; with
    other values (arange + 1) too, and that result is eager's."""
    def longer(ids):
        _, perm = torch.sort(ids, stable=True)
        return torch.empty(ids.shape[0] + 3, dtype=torch.int64).index_put((perm,), torch.arange(ids.shape[0]))

    def accumulated(ids):
        _, perm = torch.sort(ids, stable=True)
        return torch.empty_like(perm).index_put((perm,), torch.arange(ids.shape[0]), accumulate=True)

    def shifted(ids):
        _, perm = torch.sort(ids, stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(ids.shape[0]) + 1
        return inv

    ids = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(3))
    for fn in (longer, accumulated, shifted):
        gm = make_fx(fn, tracing_mode="fake")(ids)
        assert sorts_as_ranks(gm.graph) == 1
        writes = [n for n in gm.graph.nodes
                  if n.target in (torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)]
        assert len(writes) == 3, fn.__name__  # the sort's values and positions, and the model's own write
    gm, _ = lower(shifted, ids)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            assert torch.equal(gm(ids), shifted(ids))
