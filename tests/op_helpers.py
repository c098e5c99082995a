"""Shared by the op tests: which paths run, tolerances, seeds, and the checks against float64."""
import zlib

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


def stable_seed(*key) -> int:
    """A seed from a test's parameters that is the same in every process and in every test order.
    (Python's hash() of a str is salted per process -- PYTHONHASHSEED -- so seeding with it gave every
    pytest run other inputs: a run could draw a cancelling dot product that another run never saw.)"""
    return zlib.crc32("|".join(str(k) for k in key).encode())


def seeded(*key) -> torch.Generator:
    """A local generator for one test's inputs: never the global RNG, whose state depends on the tests
    that ran before."""
    return torch.Generator().manual_seed(stable_seed(*key))


# ---- checks against float64 ------------------------------------------------------------------------
#
# A fixed relative bound is right where each output element is computed without cancellation (element-wise
# ops, a norm's positive sum of squares); there `norm(got - ref) / norm(ref) <= rtol` is the check.
#
# A reduction whose terms can cancel (a dot product: linear, gated linear, the MoE's GEMMs) has an error that
# scales with the size of its terms, not with the size of its result: for sum_i x_i w_i accumulated in a
# float of unit roundoff u, |err| <= K u sum_i |x_i w_i| (worst case), about sqrt(K) u sum_i |x_i w_i| in
# practice. Relative to the result that is sqrt(K) u * kappa, kappa = sum|x_i w_i| / |sum x_i w_i|, which is
# unbounded: a fixed relative bound is flaky on some inputs and loose on the rest. So per output element:
#
#   |got - ref| <= C * ( U_ACC * sqrt(K) * cond  +  u_out * (out_roundings * |ref| + cond_roundings * cond) )
#                  + floor
#
#   cond          = sum_i |x_i w_i| (+ |bias|, + what an epilogue adds), computed in float64
#                   (matmul_condition below);
#   U_ACC = 2^-24 the unit roundoff of the accumulator: every kernel and torch reference here accumulates in
#                   fp32, whatever the operands' dtype;
#   u_out         the unit roundoff of the output dtype (fp32 2^-24, bf16 2^-8, fp16 2^-11): the result is
#                   rounded to it once (out_roundings=1), and cond_roundings counts intermediates rounded to the
#                   dtype whose size is bounded by cond (a product x*act(gate) rounded before the GEMM, a GEMM
#                   result rounded before an epilogue);
#   C = 2         one rounding may be a whole ulp (2u) instead of half: Triton's interpreter converts
#                   fp32 -> bf16 by its own rounding (about half the values one unit off nearest-even); it also
#                   covers fp32 exp/sigmoid approximations (a few 2^-24 per term, far below sqrt(K) 2^-24);
#   floor         finfo(dtype).tiny: an exact zero (cond == 0) must come out zero, up to a denormal flush.
#
# For the fp32 length-128 dot product of the flaky run this allows ~2 * 11.3 * 2^-24 * cond ~ 1.3e-6 * cond,
# where a real fault is orders above it (dropping one of the 128 terms: ~cond/128; TF32-rounded operands:
# ~2^-11 cond / sqrt(K)); tests/test_op_linear.py plants such faults and shows they fail.
# NaN or inf never passes (NaN compares False with every bound; inf - inf is NaN).

U_ACC = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BOUND_C = 2.0


def matmul_condition(x, w, bias=None):
    """sum_k |x[m, k] w[n, k]| (+ |bias[n]|) in float64: the size of the terms of F.linear(x, w, bias)."""
    cond = x.double().abs() @ w.double().abs().t()
    return cond if bias is None else cond + bias.double().abs()


def dot_bound(want, cond, k, dtype, out_roundings=1, cond_roundings=0, c=BOUND_C):
    """The element-wise bound above, for a result `want` (float64) whose last reduction has length k."""
    u_out = UNIT_ROUNDOFF[dtype]
    want, cond = want.double(), cond.double()
    return (c * (U_ACC * k ** 0.5 * cond + u_out * (out_roundings * want.abs() + cond_roundings * cond))
            + torch.finfo(dtype).tiny)


def assert_close_to_float64(got, want, *, rtol=None, cond=None, k=None, bound=None, out_roundings=1,
                            cond_roundings=0, what="result"):
    """Check `got` against a float64 reference `want`, one of:
    - rtol=...          norm-wise: norm(got - want) / norm(want) <= rtol (element-wise ops, norms);
    - cond=..., k=...   element-wise, condition-scaled: |got - want| <= dot_bound(want, cond, k, got.dtype, ...);
    - bound=...         element-wise against a bound built by the caller (a chain of reductions: the MoE),
                        cond (optional) then only names the condition in the message.
    NaN and inf never pass. A failure names the worst element: its index, value, error, bound, condition."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.double(), want.double()
    bad = ~torch.isfinite(g)
    if bad.any():
        first = _index(bad.flatten().nonzero()[0, 0], got.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values, first at {first}")
    if rtol is not None:
        assert cond is None and bound is None
        rel = ((g - w).norm() / w.norm()).item()
        assert rel <= rtol, f"{what}: norm-wise relative error {rel:.3g} > {rtol:.3g}"
        return
    if bound is None:
        assert cond is not None and k is not None, "need rtol, or cond and k, or bound"
        bound = dot_bound(w, cond, k, got.dtype, out_roundings, cond_roundings)
    err = (g - w).abs()
    bound = bound.double().expand_as(err)
    ok = err <= bound
    if not ok.all():
        ratio = torch.where(ok, 0.0, err / bound)
        i = int(ratio.flatten().argmax())
        c = None if cond is None else cond.double().expand_as(err).flatten()[i].item()
        kappa = "" if c is None else (f", condition {c:.4g} (sum|terms| / |ref| = "
                                      f"{c / max(abs(w.flatten()[i].item()), 1e-300):.3g})")
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {err.numel()} elements over the float64 bound; worst at "
            f"{_index(i, got.shape)}: got {g.flatten()[i].item():.9g}, float64 {w.flatten()[i].item():.9g}, "
            f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g} "
            f"({ratio.flatten()[i].item():.3g}x){kappa}")


def _index(flat, shape):
    idx = []
    flat = int(flat)
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))
