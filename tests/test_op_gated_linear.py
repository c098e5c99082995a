"""kunlun::gated_linear: `(x * act(gate)) @ w.T`, optionally `addend + sigmoid(row_gate) * (...)`, on the
GEMV (prologue/epilogue inside it) and on the cuBLAS path (Triton product and epilogue kernels), against
float64; strided views as the models pass them; bad arguments."""
from dataclasses import replace

import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import cpu_kernels, gated_linear, linear

from .op_helpers import DTYPES, PATHS, assert_close_to_float64, matmul_condition, needs_interpreter, seeded


def test_plan_is_the_linear_plan_with_four_warps_on_the_gemv():
    """4 warps hide the prologue's extra loads (H100 sweep, NOTES v11); the path is kunlun::linear's."""
    for rows, n, k in [(1, 2048, 4096), (1, 2048, 768), (8, 64, 2048), (4, 2048, 768), (17, 64, 64)]:
        plain, gated = linear.plan_linear(rows, n, k), gated_linear.plan_gated_linear(rows, n, k)
        assert gated.path == plain.path
        assert gated == (replace(plain, num_warps=4) if plain.path == "gemv" else plain)
    assert gated_linear.plan_gated_linear(1, 2048, 4096).num_warps == 4


def _inputs(M, N, K, dtype, gen, epilogue):
    gate_up = torch.randn(M, 2 * K, generator=gen).to(dtype)  # gate | up in one row, as a fused gate_up_proj
    gate, x = gate_up[:, :K], gate_up[:, K:]
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    if not epilogue:
        return x, gate, w, None, None
    return x, gate, w, torch.randn(M, 1, generator=gen).to(dtype), torch.randn(M, N, generator=gen).to(dtype)


def _float64(x, gate, w, activation, row_gate, addend):
    d = [None if t is None else t.double() for t in (x, gate, w, row_gate, addend)]
    return gated_linear.reference(d[0], d[1], d[2], activation, d[3], d[4])


def _condition(x, gate, w, activation, row_gate, addend):
    """sum_k |x act(gate) w| per output, through the epilogue: |addend| + sigmoid(row_gate) * that."""
    g = gate.double()
    product = x.double() * (torch.nn.functional.silu(g) if activation == "silu" else torch.sigmoid(g))
    cond = matmul_condition(product, w)
    if row_gate is not None:
        cond = torch.sigmoid(row_gate.double()) * cond
    return cond if addend is None else cond + addend.double().abs()


def _intermediate_roundings(path, M, N, K, epilogue):
    """Intermediates rounded to the dtype, each bounded by the condition: the product x*act(gate) (the GEMV's
    prologue rounds it as the reference does); on the Triton cuBLAS path the GEMM result before an epilogue;
    in torch act(gate) too and, in an epilogue, the GEMM result, sigmoid(row_gate) and their product."""
    if path == "reference":
        return 2 + 3 * epilogue
    return 1 + (epilogue and gated_linear.plan_gated_linear(M, N, K).path != "gemv")


def assert_gated_close(out, args, activation, roundings=0, what="gated_linear"):
    x, gate, w, row_gate, addend = args
    assert_close_to_float64(out, _float64(x, gate, w, activation, row_gate, addend),
                            cond=_condition(x, gate, w, activation, row_gate, addend), k=x.shape[-1],
                            cond_roundings=roundings, what=what)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("M, N, K, epilogue", [(1, 96, 256, False), (1, 33, 100, True), (3, 64, 72, True),
                                               (2, 200, 48, True), (5, 40, 64, False)])
def test_gated_linear_against_float64(path, dtype, activation, M, N, K, epilogue):
    """GEMV with whole and ragged tiles, several rows in one program; (2, 200, 48) and (5, 40, 64) are
    cuBLAS-plan sizes (product kernel, F.linear, epilogue kernel)."""
    args = _inputs(M, N, K, dtype, seeded(path, dtype, activation, M, N, K), epilogue)
    with cpu_kernels(path == "triton"):
        out = torch.ops.kunlun.gated_linear(args[0], args[1], args[2], activation, args[3], args[4])
    assert out.dtype == dtype and out.shape == (M, N)
    assert_gated_close(out, args, activation, _intermediate_roundings(path, M, N, K, epilogue))


@needs_interpreter
@pytest.mark.parametrize("rows, block_n, block_k", [(1, 2, 64), (4, 4, 32)])
def test_gated_gemv_forced_tilings(rows, block_n, block_k):
    """Several programs along N and M and K loops of several trips, with the prologue and epilogue."""
    x, gate, w, rg, r = _inputs(5, 24, 160, torch.float32, seeded("tiles", rows, block_n, block_k), True)
    plan = replace(linear.plan_linear(1, 24, 160), rows=rows, block_n=block_n, block_k=block_k)
    with cpu_kernels(True):
        out = gated_linear.triton_impl(x, gate, w, "silu", rg, r, plan=plan)
    assert_gated_close(out, (x, gate, w, rg, r), "silu", roundings=1)


@needs_interpreter
def test_gated_linear_non_unit_column_stride_and_opcheck():
    """A gate with a column stride (copied to unit stride first) and a transposed addend."""
    gen = seeded("strided-gate")
    x, w = torch.randn(2, 32, generator=gen), torch.randn(8, 32, generator=gen)
    gate = torch.randn(32, 2, generator=gen).t()
    addend = torch.randn(8, 2, generator=gen).t()
    rg = torch.randn(2, 1, generator=gen)
    with cpu_kernels(True):
        out = torch.ops.kunlun.gated_linear(x, gate, w, "sigmoid", rg, addend)
        torch.library.opcheck(torch.ops.kunlun.gated_linear.default, (x, gate, w, "silu", rg, addend))
        torch.library.opcheck(torch.ops.kunlun.gated_linear.default, (x, gate, w, "sigmoid"))
    assert_gated_close(out, (x, gate, w, rg, addend), "sigmoid", _intermediate_roundings("triton", 2, 8, 32, True))


def test_gated_linear_bad_args():
    gen = seeded("gated-bad-args")
    x, w = torch.randn(2, 8, generator=gen), torch.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.kunlun.gated_linear(x, x, w, "gelu")
    with pytest.raises(ValueError, match="gate"):
        torch.ops.kunlun.gated_linear(x, torch.randn(2, 1, generator=gen), w, "silu")
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.kunlun.gated_linear(x, x.double(), w, "silu")
    with pytest.raises(ValueError, match="row_gate"):
        torch.ops.kunlun.gated_linear(x, x, w, "silu", torch.randn(2, 4, generator=gen))
    with pytest.raises(ValueError, match="addend"):
        torch.ops.kunlun.gated_linear(x, x, w, "silu", None, torch.randn(2, 5, generator=gen))
