"""Shared by the op tests: which paths run, tolerances, and rounding checks."""
import pytest
import torch

from kunlun_compile.ops import interpreter_usable

# The Triton path on CPU tensors needs the interpreter, which conftest turns on only without a GPU.
PATHS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_usable(), reason="Triton interpreter off (CUDA machine): the GPU tests cover the kernels"))]
needs_interpreter = pytest.mark.skipif(not interpreter_usable(), reason="Triton interpreter off (CUDA machine)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative error of a result rounded to the dtype, against float64 math
DTYPE_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}

# Triton's interpreter converts fp32 -> bf16 by its own rounding (about half the values land one unit
# away from round-to-nearest-even, which the GPU does), so on the CPU a bf16 result can only be held to
# one unit per rounding step of the reference; on CUDA the GPU tests hold it tighter.
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def assert_same_rounding(got, want, roundings, magnitude=None):
    """`magnitude`: the size of the intermediates, where a difference of roundings cancels (rotary)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * (magnitude or 1))
    else:
        atol = roundings * ULP[got.dtype] * magnitude if magnitude else 1e-3 * roundings
        torch.testing.assert_close(got, want, rtol=roundings * ULP[got.dtype], atol=atol)


def seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(hash(tuple(str(k) for k in key)) % 2**31)
