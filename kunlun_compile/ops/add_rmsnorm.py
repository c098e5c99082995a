"""kunlun::fused_add_rmsnorm — residual add + RMSNorm in one pass over the row.

    new_residual = x + residual
    out = rmsnorm(new_residual) * (weight + norm_offset)
(sum_in_dtype: normalise the sum as rounded to the dtype, as HF's separate add leaves it)

and kunlun::rms_norm(x, weight, eps, norm_offset), the same without a residual
(one kernel, the residual part compiled out).

Rounding reproduces the module being replaced (bf16/fp16; fp32 is exact either way):
- norm_offset == 0, vLLM `RMSNorm`: the sum is formed in fp32 and normalised
  unrounded; the normalised value is cast to the input dtype *before* the
  weight multiply, which happens in the input dtype.
- norm_offset != 0, Gemma style (Qwen3-Next): the sum is rounded to the input
  dtype (that is the residual), normalised in fp32, multiplied by
  `(w + offset)` in fp32 and cast once.
- sum_in_dtype=True with norm_offset == 0, HF transformers (the residual add is
  a separate op in the dtype): the rounded sum is normalised, then as vLLM.
- weight_in_float=True with norm_offset == 0, torch's `F.rms_norm` / `nn.RMSNorm`
  and HF's `(weight * x).to(dtype)`: as Gemma style with an offset of 0 (the
  weight multiplies in fp32, the product is rounded once).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..triton_kernel import contiguous_results, kernel, use_triton, wait_for_producers


def check_args(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> None:
    if residual is None:
        residual = x
    if x.shape != residual.shape:
        raise ValueError(f"fused_add_rmsnorm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"fused_add_rmsnorm: weight {tuple(weight.shape)} must be [{x.shape[-1]}] "
                         f"(the last dim of x {tuple(x.shape)})")
    if x.dtype != residual.dtype or not x.is_floating_point():
        raise ValueError(f"fused_add_rmsnorm: x and residual must share one float dtype, got {x.dtype}, "
                         f"{residual.dtype}")
    if not eps > 0:
        raise ValueError(f"fused_add_rmsnorm: eps must be > 0, got {eps}")


def _weight_in_float(norm_offset: float, weight_in_float: bool) -> bool:
    return weight_in_float or norm_offset != 0.0


def reference(x, residual, weight, eps: float, norm_offset: float,
              sum_in_dtype: bool = False, weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The definition of correct, in plain torch (residual None: a lone RMSNorm, new_residual is x)."""
    dtype = x.dtype
    total = x.float() if residual is None else x.float() + residual.float()
    new_residual = total.to(dtype)
    if sum_in_dtype:
        total = new_residual.float()
    if not _weight_in_float(norm_offset, weight_in_float):
        normed = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        return normed * weight.to(dtype), new_residual
    r = new_residual.float()
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (weight.float() + norm_offset)).to(dtype), new_residual


@kernel
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, new_r_ptr, n_cols, eps, norm_offset,
                        x_stride, r_stride, out_stride, new_r_stride,
                        GEMMA: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_IN_DTYPE: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    total = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        total = total + r.to(tl.float32)
    new_r = total.to(x.dtype)
    if SUM_IN_DTYPE:
        total = new_r.to(tl.float32)
    if HAS_RESIDUAL:
        tl.store(new_r_ptr + row * new_r_stride + cols, new_r, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if GEMMA:
        s = new_r.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
        out = (s * inv * (w.to(tl.float32) + norm_offset)).to(x.dtype)
    else:
        inv = 1.0 / tl.sqrt(tl.sum(total * total, axis=0) / n_cols + eps)
        # round to the dtype, then the weight multiply rounded again: a bf16/fp16 multiply
        # done exactly in fp32 (the product of two 8/11-bit mantissas fits), as torch does it
        out = ((total * inv).to(x.dtype).to(tl.float32) * w.to(x.dtype).to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def triton_impl(x, residual, weight, eps: float, norm_offset: float,
                sum_in_dtype: bool = False, weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """residual None: only `out` is written; the second result is an empty [0] tensor."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2 if residual is None else residual.reshape(-1, n_cols)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    w = weight.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    new_r = out if residual is None else torch.empty_like(out)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n_cols)
        num_warps = min(max(block // 256, 1), 16)
        _add_rmsnorm_kernel.on(x.device)[(rows,)](
            x2, r2, w, out, new_r, n_cols, eps, norm_offset,
            x2.stride(0), r2.stride(0), out.stride(0), new_r.stride(0),
            GEMMA=_weight_in_float(norm_offset, weight_in_float), HAS_RESIDUAL=residual is not None,
            SUM_IN_DTYPE=sum_in_dtype,
            BLOCK=block, num_warps=num_warps)
    if residual is None:
        return out.view(x.shape), out.new_empty(0)
    return out.view(x.shape), new_r.view(x.shape)


@torch.library.custom_op("kunlun::fused_add_rmsnorm", mutates_args=())
def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      norm_offset: float, sum_in_dtype: bool = False,
                      weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    check_args(x, residual, weight, eps)
    if use_triton(x):
        return triton_impl(x, residual, weight, eps, norm_offset, sum_in_dtype, weight_in_float)
    return contiguous_results(reference(x, residual, weight, eps, norm_offset, sum_in_dtype, weight_in_float))


@fused_add_rmsnorm.register_fake
def _(x, residual, weight, eps, norm_offset, sum_in_dtype=False, weight_in_float=False):
    check_args(x, residual, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("kunlun::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_offset: float,
             weight_in_float: bool = False) -> torch.Tensor:
    check_args(x, None, weight, eps)
    if use_triton(x):
        return triton_impl(x, None, weight, eps, norm_offset, weight_in_float=weight_in_float)[0]
    return contiguous_results(reference(x, None, weight, eps, norm_offset, weight_in_float=weight_in_float)[0])


@rms_norm.register_fake
def _(x, weight, eps, norm_offset, weight_in_float=False):
    check_args(x, None, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
