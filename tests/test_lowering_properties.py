"""Property tests: random element-wise programs (and programs with reductions), lowered, equal eager.

Each example traces a random program (tests/lowering_programs.py) to an ATen
graph, runs the lowering pass on it, and runs the result twice: through the
KIR interpreter (torch) and through the generated Triton kernels under
Triton's interpreter.  Both must equal eager within a tolerance scaled by the
largest intermediate value of a float64 run (cancellation makes relative
error meaningless for single elements).  fp32 is held to float32 rounding;
bf16/fp16 to a few units of the result type (the Triton interpreter rounds
fp32 -> bf16 differently from the GPU, up to one unit per rounding; the GPU
tests hold the compiled kernels to eager exactly where the forms are precise).
NaN/inf positions must match eager's.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch.fx.experimental.proxy_tensor import make_fx

from kunlun_compile.config import CompileConfig
from kunlun_compile.graph_stats import count_kernels
from kunlun_compile.ops import cpu_kernels
from kunlun_compile.passes import PassContext
from kunlun_compile.passes.lower_elementwise import lower_elementwise

from .lowering_programs import BINARY, COMPARE, LOGICAL, UNARY, UNARY_LOGICAL, programs, run

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# units of the result dtype allowed, per path
TOL_UNITS = {"float32": (8, 8), "bfloat16": (4, 16), "float16": (4, 16)}  # (KIR interpreter, Triton interpreter)


def sinks(program, n_inputs):
    used = {i for _, _, args in program for i in args}
    return [k for k in range(len(program)) if n_inputs + k not in used]


def make_inputs(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 2).to(getattr(torch, dtype)) for s in shapes]


def lowered(program, inputs, config=None, tracing_mode="fake"):
    keep = sinks(program, len(inputs))

    def fn(*xs):
        vals = run(program, xs)
        return [vals[k] for k in keep]

    gm = make_fx(fn, tracing_mode=tracing_mode)(*inputs)
    gm.graph.eliminate_dead_code()  # as the backend's dead_code pass does before lowering
    outcome = lower_elementwise(gm, PassContext(config or CompileConfig(), "prop"))
    gm.graph.lint()
    gm.recompile()
    return gm, fn, outcome


def scale_of(program, inputs):
    vals = run(program, [x.double() for x in inputs]) + [x.double() for x in inputs]
    finite = [v[torch.isfinite(v)].abs().max() for v in vals if v.is_floating_point() and torch.isfinite(v).any()]
    return max([1.0] + [float(v) for v in finite])


def check_close(got, want, dtype, units, scale):
    eps = torch.finfo(getattr(torch, dtype)).eps
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if w.dtype == torch.bool:
            # a comparison of values that differ by rounding may flip; allow only where eager's operands are close
            mismatch = (g != w).float().mean().item()
            assert mismatch <= 0.1, f"bool results differ at {mismatch:.0%} of elements"
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=units * eps, atol=units * eps * scale,
                                   equal_nan=True)


@SETTINGS
@given(programs(), __import__("hypothesis").strategies.integers(0, 2**16))
def test_random_programs_equal_eager(case, seed):
    program, shapes, dtype = case
    inputs = make_inputs(shapes, dtype, seed)
    gm, fn, outcome = lowered(program, inputs)
    assert count_kernels(gm)["aten"] == 0, f"element-wise ops left as ATen: {outcome.near_misses}"
    assert outcome.matches >= 1
    want = fn(*inputs)
    scale = scale_of(program, inputs)
    kir_units, triton_units = TOL_UNITS[dtype]
    with cpu_kernels(False):  # kunlun::pointwise runs the KIR interpreter
        check_close(gm(*inputs), want, dtype, kir_units, scale)
    with cpu_kernels(True):  # generated Triton under Triton's interpreter
        check_close(gm(*inputs), want, dtype, triton_units, scale)


def assert_lowered_equals_eager(case, seed, units: int = 1):
    """The program lowered, no cluster refused, both interpreters within `units` times the dtype's tolerance."""
    program, shapes, dtype = case
    inputs = make_inputs(shapes, dtype, seed)
    gm, fn, outcome = lowered(program, inputs)
    assert not [m for m in outcome.near_misses if m.startswith("cluster at")], outcome.near_misses
    want = fn(*inputs)
    scale = scale_of(program, inputs)
    kir_units, triton_units = TOL_UNITS[dtype]
    with cpu_kernels(False):
        check_close(gm(*inputs), want, dtype, units * kir_units, scale)
    with cpu_kernels(True):
        check_close(gm(*inputs), want, dtype, units * triton_units, scale)
    return outcome


@SETTINGS
@given(programs(reductions=True), __import__("hypothesis").strategies.integers(0, 2**16))
def test_random_programs_with_reductions_equal_eager(case, seed):
    """Reductions (sum, mean, amax, amin, var, softmax, log_softmax) along random dims among element-wise steps:
    row kernels with their producers and consumers.  A reduction of a dim of size 1 (a value that was already
    reduced there) is a conversion; only a variance of one may stay ATen (NaN by its correction); no cluster
    may be refused."""
    outcome = assert_lowered_equals_eager(case, seed, units=2)
    assert all("size 1" in m and "var" in m for m in outcome.near_misses if "reduce" in m), outcome.near_misses


@SETTINGS
@given(programs(indexing=True), __import__("hypothesis").strategies.integers(0, 2**16))
def test_random_programs_with_indexing_equal_eager(case, seed):
    """Cat of slices, gathers by arange ids and transposes of computed values among element-wise steps: read in
    place by the kernels that need them (indexed loads, producers evaluated at other coordinates).  Values move,
    nothing is recomputed differently: the same tolerance as element-wise programs, and no cluster refused."""
    assert_lowered_equals_eager(case, seed)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs(max_steps=8, reductions=True, indexing=True), __import__("hypothesis").strategies.integers(0, 2**16))
def test_random_programs_with_reductions_and_indexing_equal_eager(case, seed):
    """Reductions among moved values: a row kernel takes indexing producers and consumers (it reads at index
    expressions; a reduction is evaluated at the rows its readers ask for, only its own), or the values cross
    memory between kernels.  The reductions' tolerance, no cluster refused."""
    assert_lowered_equals_eager(case, seed, units=2)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(programs(max_steps=4), __import__("hypothesis").strategies.integers(0, 2**16))
def test_random_programs_fast_math_within_bound(case, seed):
    """fast_math: approximate forms and no intermediate rounding; the documented bound is a few result units
    over the float64 scale (the approximations' errors are ~2^-21 relative, far below bf16/fp16 units)."""
    program, shapes, dtype = case
    inputs = make_inputs(shapes, dtype, seed)
    gm, fn, _ = lowered(program, inputs, CompileConfig(fast_math=True))
    want = fn(*inputs)
    units = 64 if dtype == "float32" else 16
    with cpu_kernels(True):
        check_close(gm(*inputs), want, dtype, units, scale_of(program, inputs))


EVERY_OP = ([[("unary", name, (0,))] for name in sorted(UNARY)]
            + [[("binary", name, (0, 1))] for name in sorted(BINARY)]
            + [[("compare", name, (0, 1)), ("where", "", (2, 0, 1))] for name in sorted(COMPARE)]
            + [[("compare", "gt", (0, 1)), ("compare", "lt", (0, 1)), ("logical", name, (2, 3)),
                ("masked_fill", "", (4, 0))] for name in sorted(LOGICAL)]
            + [[("compare", "ge", (0, 1)), ("not", name, (2,)), ("where", "", (3, 1, 0))]
               for name in sorted(UNARY_LOGICAL)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("program", EVERY_OP, ids=lambda p: "-".join(step[1] or step[0] for step in p))
def test_every_op_equals_eager(program, dtype):
    """Each op of the lowering table on its own (the random programs may not draw every one)."""
    inputs = make_inputs([(4, 33), (33,)], dtype, seed=len(program))
    gm, fn, outcome = lowered(program, inputs)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    want = fn(*inputs)
    scale = scale_of(program, inputs)
    with cpu_kernels(False):
        check_close(gm(*inputs), want, dtype, 2, scale)
    with cpu_kernels(True):
        check_close(gm(*inputs), want, dtype, 4 if dtype == "float32" else 2, scale)
