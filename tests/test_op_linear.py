"""kunlun::linear: the plan (GEMV vs cuBLAS by size), the GEMV kernel against float64, bad arguments."""
from dataclasses import replace

import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import cpu_kernels, linear

from .op_helpers import (DTYPES, PATHS, UNIT_ROUNDOFF, assert_close_to_float64, matmul_condition, needs_interpreter,
                         seeded, stable_seed)


def test_plan_gemv_at_one_row_and_on_narrow_outputs_only():
    wide, narrow = (2560, 2048), (64, 2048)
    assert linear.plan_linear(1, *wide).path == "gemv"
    assert [linear.plan_linear(m, *wide).path for m in (2, 4, 16)] == ["cublas"] * 3
    assert [linear.plan_linear(m, *narrow).path for m in (1, 2, 16)] == ["gemv"] * 3
    assert linear.plan_linear(17, *narrow).path == "cublas"
    assert linear.plan_linear(0, *wide).path == "cublas"  # nothing to launch
    p = linear.plan_linear(3, *narrow)
    assert (p.rows, p.block_n) == (4, 1)  # all rows in one program: the weight is read once
    assert linear.plan_linear(1, 2048, 768).block_k == 1024 and linear.plan_linear(1, 8, 24).block_k == 32
    with pytest.raises(ValueError, match="bad sizes"):
        linear.plan_linear(1, 0, 8)


def _inputs(M, N, K, dtype, gen, bias):
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, w, b


def _float64(x, w, b):
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


def assert_linear_close(out, x, w, b=None, what="linear"):
    """Per output element, within the fp32-accumulation bound scaled by sum_k |x w| (tests/op_helpers.py)."""
    assert_close_to_float64(out, _float64(x, w, b), cond=matmul_condition(x, w, b), k=x.shape[-1], what=what)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, bias", [(1, 96, 256, False), (1, 33, 100, True), (3, 64, 512, True),
                                           (16, 1, 64, False), (2, 200, 48, False)])
def test_linear_against_float64(path, dtype, M, N, K, bias):
    """Shapes: the GEMV with whole tiles, ragged N and K, several rows in one program, one output column;
    (2, 200, 48) is a cuBLAS-plan size (F.linear inside the op)."""
    x, w, b = _inputs(M, N, K, dtype, seeded(path, dtype, M, N, K), bias)
    with cpu_kernels(path == "triton"):
        out = torch.ops.kunlun.linear(x, w, b)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_linear_close(out, x, w, b)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, block_n, block_k", [(1, 2, 64), (4, 4, 32), (2, 8, 128)])
def test_gemv_kernel_tilings(dtype, rows, block_n, block_k):
    """Forced tilings: several programs along N and along M, K loops of several trips."""
    M, N, K = 5, 24, 160
    x, w, b = _inputs(M, N, K, dtype, seeded(dtype, rows, block_n, block_k), True)
    plan = replace(linear.plan_linear(1, N, K), rows=rows, block_n=block_n, block_k=block_k)
    with cpu_kernels(True):
        out = linear.triton_impl(x, w, b, plan=plan)
    assert_linear_close(out, x, w, b)


@needs_interpreter
def test_strided_operands():
    """x with a row stride (a split view), and a weight that is not row-major (F.linear fallback)."""
    gen = seeded("strided")
    qkv = torch.randn(1, 3 * 64, generator=gen)
    x = qkv[:, 64:128]
    w = torch.randn(48, 64, generator=gen)
    with cpu_kernels(True):
        out = torch.ops.kunlun.linear(x, w)
        out_t = torch.ops.kunlun.linear(x, w.t().contiguous().t())
    assert_linear_close(out, x, w)
    assert_linear_close(out_t, x, w, what="transposed weight")


@pytest.mark.parametrize("path", PATHS)
def test_linear_opcheck(path):
    x, w, b = _inputs(1, 40, 64, torch.float32, seeded("opcheck", path), True)
    with cpu_kernels(path == "triton"):
        torch.library.opcheck(torch.ops.kunlun.linear.default, (x, w, b))
        torch.library.opcheck(torch.ops.kunlun.linear.default, (x, w, None))


def test_linear_bad_args():
    gen = seeded("linear-bad-args")
    x = torch.randn(2, 8, generator=gen)
    with pytest.raises(ValueError, match="need x"):
        torch.ops.kunlun.linear(x, torch.randn(4, 9, generator=gen))
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.kunlun.linear(x, torch.randn(4, 8, generator=gen, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        torch.ops.kunlun.linear(x, torch.randn(4, 8, generator=gen), torch.randn(5, generator=gen))


# ---- kunlun::linear_group: sibling linears of one input in one launch ----------------------------------

def test_group_plan_shares_one_launch_among_gemv_members():
    plan, gemv = linear.plan_linear_group(1, [64, 1536, 1], 2048)
    assert gemv == [0, 1, 2] and plan.block_n == 2  # the wide member's tiles
    plan, gemv = linear.plan_linear_group(4, [64, 1536, 1], 2048)
    assert gemv == [0, 2] and plan.block_n == 1  # the wide one runs cuBLAS at 4 rows
    assert linear.plan_linear_group(32, [64, 1], 2048)[1] == []
    assert "one launch for 64+1; F.linear (cuBLAS) for 1536" in linear.describe_linear_group(4, [64, 1536, 1], 2048)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, ns, K", [(1, [64, 40, 1], 128), (3, [8, 100, 1], 100), (1, [5, 6, 7, 8, 9, 10], 64)])
def test_linear_group_against_float64(path, dtype, M, ns, K):
    """All members on the GEMV; a wide member on cuBLAS beside two GEMV ones (3 rows); more weights than one
    launch takes (MAX_GROUP)."""
    gen = seeded("group", path, dtype, M, ns, K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    ws = [(torch.randn(n, K, generator=gen) / K ** 0.5).to(dtype) for n in ns]
    with cpu_kernels(path == "triton"):
        outs = torch.ops.kunlun.linear_group(x, ws)
    assert [tuple(o.shape) for o in outs] == [(M, n) for n in ns] and all(o.dtype == dtype for o in outs)
    for i, (o, w) in enumerate(zip(outs, ws)):
        assert_linear_close(o, x, w, what=f"member {i} ({w.shape[0]} outputs)")


@needs_interpreter
def test_linear_group_forced_tiles_and_opcheck():
    gen = seeded("group-tiles")
    x = torch.randn(3, 96, generator=gen)
    ws = [torch.randn(n, 96, generator=gen) for n in (7, 16, 1, 33, 5)]
    plan = replace(linear.plan_linear(1, 16, 96), rows=2, block_n=4, block_k=32)
    with cpu_kernels(True):
        outs = linear.triton_group_impl(x, ws, plan=plan)
        torch.library.opcheck(torch.ops.kunlun.linear_group.default, (x[:1], ws[:3]))
    for i, (o, w) in enumerate(zip(outs, ws)):
        assert_linear_close(o, x, w, what=f"member {i}")
    with pytest.raises(ValueError, match="no weights"):
        torch.ops.kunlun.linear_group(x, [])
    with pytest.raises(ValueError, match="need x"):
        torch.ops.kunlun.linear_group(x, [ws[0], torch.randn(4, 95, generator=gen)])


# ---- the float64 check itself: stable inputs, and a bound that still catches real faults -----------------

def test_inputs_depend_only_on_the_parameters():
    """Seeds come from the parameters through crc32 (not Python's per-process salted hash()), and inputs come
    from a local generator, so neither the process nor the global RNG left by earlier tests changes them."""
    assert stable_seed("group", "triton", torch.float32, 1, [64, 40, 1], 128) == 1845394185
    with torch.random.fork_rng():
        draws = []
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)
            torch.randn(7)  # as an earlier test would
            draws.append(_inputs(1, 8, 16, torch.float32, seeded("stable", 1), True))
    assert all(torch.equal(a, b) for a, b in zip(*draws))


def _rounded_to_tf32(t):
    """fp32 with a 10-bit mantissa (round to nearest): what TF32 tensor cores read."""
    i = t.float().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _accumulated_in(x, w, dtype, tile=32):
    """The dot product with its partial sum rounded to `dtype` after every K tile (an accumulator kept in the
    operands' dtype instead of fp32)."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=dtype)
    for k in range(0, x.shape[1], tile):
        acc = (acc.float() + x[:, k:k + tile].float() @ w[:, k:k + tile].float().t()).to(dtype)
    return acc


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_float64_check_catches_planted_faults(dtype):
    """The condition-scaled bound passes the kernel's result and fails each planted fault: the last K element
    dropped (a masking bug), dropped in one output column only (a ragged-tile bug that a norm-wise check over
    the whole output averages away), fp32 operands rounded to TF32 / a bf16-fp16 accumulator, and in bf16/fp16
    one weight 4 ulps off (at the output where its term is largest). In fp32 a few ulps in one weight move an
    output by ~2^-21 sum|x w|, below the rounding noise of a correct length-K fp32 accumulation
    (~sqrt(K) 2^-24 sum|x w|): no sound bound can see that, so it is not planted there."""
    M, N, K = 2, 64, 128
    x, w, _ = _inputs(M, N, K, dtype, seeded("planted", dtype), False)
    with cpu_kernels(True):
        out = torch.ops.kunlun.linear(x, w)
    assert_linear_close(out, x, w)
    f32 = torch.nn.functional.linear
    faults = {"last K element dropped": f32(x[:, :-1].float(), w[:, :-1].float()).to(dtype)}
    one_column = out.clone()
    one_column[:, -1] = f32(x[:, :-1].float(), w[-1:, :-1].float())[:, 0].to(dtype)
    faults["last K element dropped in the last column"] = one_column
    if dtype == torch.float32:
        faults["TF32 operands"] = f32(_rounded_to_tf32(x), _rounded_to_tf32(w))
    else:
        faults["accumulator in the dtype"] = _accumulated_in(x, w, dtype)
        terms = x[0].double().abs()[None, :] * w.double().abs()  # row 0's terms, [N, K]
        n, k = divmod(int((terms / _float64(x, w, None)[0].abs()[:, None]).argmax()), K)
        w_bad = w.clone()
        w_bad[n, k] = w[n, k] + 4 * UNIT_ROUNDOFF[dtype] * 2 * w[n, k].abs()  # 4 ulps of the dtype
        faults["one weight 4 ulps off"] = f32(x.float(), w_bad.float()).to(dtype)
    for name, bad in faults.items():
        with pytest.raises(AssertionError, match="over the float64 bound") as caught:
            assert_linear_close(bad, x, w, what=name)
        print(f"{dtype} {name}: {caught.value}")
    for value in (float("nan"), float("inf")):  # never within any bound
        bad = out.clone()
        bad[1, 7] = value
        with pytest.raises(AssertionError, match=r"1 non-finite values, first at \(1, 7\)"):
            assert_linear_close(bad, x, w)
