"""kunlun:: ops against float64 math, through the torch reference and the Triton kernels (interpreter)."""
import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import add_rmsnorm, cpu_kernels, interpreter_usable

from .conftest import rel_err
from .op_helpers import DTYPE_TOL, DTYPES, PATHS, assert_same_rounding, needs_interpreter, seeded


def _add_rmsnorm_inputs(rows, cols, dtype, gen):
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    r = torch.randn(rows, cols, generator=gen).to(dtype)
    w = (1.0 + 0.3 * torch.randn(cols, generator=gen)).to(dtype)
    return x, r, w


def _add_rmsnorm_float64(x, r, w, eps, offset):
    s = x.double() + r.double()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset), s


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 100), (1, 2048)])
def test_fused_add_rmsnorm(path, dtype, offset, shape):
    gen = seeded(path, dtype, offset, shape)
    x = torch.randn(*shape, generator=gen).to(dtype)
    r = torch.randn(*shape, generator=gen).to(dtype)
    w = (offset == 0) + 0.3 * torch.randn(shape[-1], generator=gen)
    w = w.to(dtype)
    with cpu_kernels(path == "triton"):
        out, new_r = torch.ops.kunlun.fused_add_rmsnorm(x, r, w, 1e-6, offset)
    want, want_r = _add_rmsnorm_float64(x, r, w, 1e-6, offset)
    assert out.dtype == dtype and out.shape == x.shape and new_r.shape == x.shape
    assert rel_err(new_r, want_r) <= DTYPE_TOL[dtype]
    assert rel_err(out, want) <= 2 * DTYPE_TOL[dtype] + (4e-3 if dtype != torch.float32 else 0)
    # and the rounding of the reference implementation
    ref_out, ref_r = add_rmsnorm.reference(x, r, w, 1e-6, offset)
    assert_same_rounding(new_r, ref_r, roundings=1)
    assert_same_rounding(out, ref_out, roundings=2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 100)])
def test_rms_norm_without_residual(path, dtype, offset, shape):
    gen = seeded("lone", path, dtype, offset, shape)
    x = torch.randn(*shape, generator=gen).to(dtype)
    w = ((offset == 0) + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype)
    with cpu_kernels(path == "triton"):
        out = torch.ops.kunlun.rms_norm(x, w, 1e-6, offset)
    want, _ = _add_rmsnorm_float64(x, torch.zeros_like(x), w, 1e-6, offset)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, want) <= 2 * DTYPE_TOL[dtype] + (4e-3 if dtype != torch.float32 else 0)
    assert_same_rounding(out, add_rmsnorm.reference(x, None, w, 1e-6, offset)[0], roundings=2)
    torch.library.opcheck(torch.ops.kunlun.rms_norm.default, (x, w, 1e-6, offset))


@needs_interpreter
def test_fused_add_rmsnorm_matches_the_modules_it_replaces_bf16():
    from kunlun_compile.models.layers import GemmaRMSNorm, RMSNorm

    gen = torch.Generator().manual_seed(3)
    x, r, _ = _add_rmsnorm_inputs(9, 96, torch.bfloat16, gen)
    for module, offset in [(RMSNorm(96), 0.0), (GemmaRMSNorm(96), 1.0)]:
        module = module.to(torch.bfloat16)
        want_out, want_r = module(x, r)
        for triton_path in [False, True]:
            with cpu_kernels(triton_path):
                out, new_r = torch.ops.kunlun.fused_add_rmsnorm(x, r, module.weight, module.eps, offset)
            assert_same_rounding(new_r, want_r, roundings=1)
            assert_same_rounding(out, want_out, roundings=2)


def test_fused_add_rmsnorm_sum_in_dtype_matches_hf_bf16():
    """HF adds the residual as its own op (rounded to bf16) and normalises that: sum_in_dtype=True."""
    hf = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(5)
    x, r, _ = _add_rmsnorm_inputs(33, 96, torch.bfloat16, gen)
    norm = hf.LlamaRMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=gen))
        want_r = r + x
        want_out = norm(want_r)
    paths = [False, True] if interpreter_usable() else [False]
    for triton_path in paths:
        with cpu_kernels(triton_path), torch.no_grad():
            out, new_r = torch.ops.kunlun.fused_add_rmsnorm(x, r, norm.weight, 1e-6, 0.0, True)
            unrounded, _ = torch.ops.kunlun.fused_add_rmsnorm(x, r, norm.weight, 1e-6, 0.0)
        assert_same_rounding(new_r, want_r, roundings=1 if triton_path else 0.01)
        assert_same_rounding(out, want_out, roundings=3 if triton_path else 0.01)  # sum, cast, weight
    assert not torch.equal(unrounded, want_out)  # the flag matters in bf16: the two forms round differently
    torch.library.opcheck(torch.ops.kunlun.fused_add_rmsnorm.default, (x, r, norm.weight.detach(), 1e-6, 0.0, True))


def test_fused_add_rmsnorm_bad_args():
    gen = seeded("add-rmsnorm-bad-args")
    x, w = torch.randn(4, 8, generator=gen), torch.randn(8, generator=gen)
    with pytest.raises(ValueError, match="differ"):
        torch.ops.kunlun.fused_add_rmsnorm(x, torch.randn(4, 9, generator=gen), w, 1e-6, 0.0)
    with pytest.raises(ValueError, match="weight"):
        torch.ops.kunlun.fused_add_rmsnorm(x, x, torch.randn(9, generator=gen), 1e-6, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.kunlun.fused_add_rmsnorm(x, x.double(), w, 1e-6, 0.0)
    with pytest.raises(ValueError, match="eps"):
        torch.ops.kunlun.fused_add_rmsnorm(x, x, w, 0.0, 0.0)


@pytest.mark.parametrize("path", PATHS)
def test_fused_add_rmsnorm_opcheck(path):
    gen = seeded("add-rmsnorm-opcheck", path)
    x, r = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen)
    with cpu_kernels(path == "triton"):
        _opcheck_add_rmsnorm(x, r, gen)


def _opcheck_add_rmsnorm(x, r, gen):
    torch.library.opcheck(torch.ops.kunlun.fused_add_rmsnorm.default, (x, r, torch.randn(32, generator=gen), 1e-5, 0.0))
    torch.library.opcheck(torch.ops.kunlun.fused_add_rmsnorm.default, (x, r, torch.randn(32, generator=gen), 1e-5, 1.0))


# ---- masked_input -----------------------------------------------------------------------------------

MASK_CASES = [  # org_start, org_end, padding, added_start, added_end
    (0, 1000, 0, 1000, 1000),  # one shard, no added vocab
    (1000, 2000, 0, 4000, 4000),  # second of four shards
    (0, 1000, 24, 4000, 4016),  # with padding and added (LoRA) vocab
    (3000, 4000, 0, 4000, 4016),
]


def _masked_input_python(ids, s, e, pad, a_s, a_e):
    """Per element, from the definition (no vectorised tricks)."""
    out, inv = [], []
    for t in ids.tolist():
        if s <= t < e:
            out.append(t - s)
            inv.append(False)
        elif a_s <= t < a_e:
            out.append(t - a_s + (e - s) + pad)
            inv.append(False)
        else:
            out.append(0)
            inv.append(True)
    return torch.tensor(out, dtype=torch.int64), torch.tensor(inv)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_masked_input(path, case, dtype):
    gen = seeded("masked", path, case, dtype)
    ids = torch.randint(0, 4100, (2500,), generator=gen).to(dtype)
    want, want_inv = _masked_input_python(ids, *case)
    with cpu_kernels(path == "triton"):
        got, inv = torch.ops.kunlun.masked_input(ids, *case)
    assert got.dtype == torch.int64 and inv.dtype == torch.bool  # as vLLM's formulation promotes
    assert torch.equal(got, want) and torch.equal(inv, want_inv)
    assert (~inv).any() and inv.any() or case == MASK_CASES[0]


@needs_interpreter
def test_masked_input_matches_vllm_formulation_2d():
    from kunlun_compile.models.layers import get_masked_input_and_mask

    ids = torch.randint(0, 5000, (3, 77), generator=seeded("masked-2d"))
    want = get_masked_input_and_mask(ids, 1000, 2000, 8, 4000, 4010)
    with cpu_kernels(True):
        got = torch.ops.kunlun.masked_input(ids, 1000, 2000, 8, 4000, 4010)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run compiled")
def test_the_test_process_interprets_triton():
    """CPU test runs must exercise the real kernels, not only the reference."""
    from kunlun_compile.ops import interpreter_usable, use_triton

    assert interpreter_usable()
    assert use_triton(torch.empty(1))  # default in the test process: the Triton path


def test_masked_input_bad_args_and_opcheck():
    with pytest.raises(ValueError, match="int32 or int64"):
        torch.ops.kunlun.masked_input(torch.ones(4), 0, 10, 0, 10, 10)
    with pytest.raises(ValueError, match="bad vocab ranges"):
        torch.ops.kunlun.masked_input(torch.arange(4), 10, 0, 0, 10, 10)
    ids = torch.randint(0, 50, (40,), generator=seeded("masked-opcheck"))
    torch.library.opcheck(torch.ops.kunlun.masked_input.default, (ids, 10, 20, 0, 40, 45))
