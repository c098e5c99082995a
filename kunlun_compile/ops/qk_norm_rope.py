"""kunlun::qk_norm_rope — the attention prologue of models with separate q and k projections.

HF transformers' Llama/Qwen3 form: per-head RMSNorm of q and k (optional), then
rotary from per-token cos/sin tables that are already expanded to full width:

    out = x * cos + rotate(x) * sin      over the first R = cos.shape[1] dims of each head
    rotate(x) = cat(-x2, x1)             neox (`rotate_half`, x1/x2 the halves)
              = interleave(-x_odd, x_even)   GPT-J (`rotate_every_two`)

q [T, Hq, D], k [T, Hkv, D], cos/sin [T, R] (or, `half_width`, [T, R/2]: one angle per rotated pair,
the table a model widens with `cat((cos, cos))` or pairs interleaved; any column stride, so the real parts
of a complex table are read in place); returns q and k, contiguous, same shapes.
One launch of the split_norm_rope_gate kernel (the q and k rows come from two tensors,
cos/sin from row t at column d instead of `cache[positions[t]]` at the pair's column).

Rounding reproduces the HF modules in bf16/fp16: normalised value cast to the dtype,
then the weight multiply in the dtype; cos/sin in the dtype; each product and the sum
rounded (`norm_offset != 0` is the Gemma form, `weight_in_float` torch's RMSNorm, as in
kunlun::split_norm_rope_gate).
`float_math` is the upcast form instead, `reference(q.float(), k.float(), ...)` rounded once to q's
dtype: what a model computes when it rotates `x.float()` and casts the result back, without the two
casts' kernels and the float32 round trip through memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..triton_kernel import use_triton
from .norm_rope_gate import _rms_norm_head, launch_norm_rope


def check_args(q, k, q_weight, k_weight, cos, sin, eps, half_width: bool = False) -> None:
    name = "qk_norm_rope"
    if q.dim() != 3 or k.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"{name}: q and k must be float [tokens, heads, head_dim], got {tuple(q.shape)} "
                         f"{q.dtype} and {tuple(k.shape)}")
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{name}: q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must share "
                         "tokens, head_dim and dtype")
    T, D = q.shape[0], q.shape[2]
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != T:
        raise ValueError(f"{name}: cos and sin must both be [{T}, {'rotary_dim / 2' if half_width else 'rotary_dim'}]"
                         f", got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rot = cos.shape[1] * (2 if half_width else 1)
    if rot % 2 or rot > D or not cos.is_floating_point() or cos.dtype != sin.dtype:
        raise ValueError(f"{name}: rotary_dim {rot} must be even and <= head_dim {D}; cos/sin {cos.dtype}, "
                         f"{sin.dtype} must be one float dtype")
    if (q_weight is None) != (k_weight is None):
        raise ValueError(f"{name}: give both q_weight and k_weight, or neither")
    for w, label in ((q_weight, "q_weight"), (k_weight, "k_weight")):
        if w is not None and (w.dim() != 1 or w.shape[0] != D):
            raise ValueError(f"{name}: {label} must be [{D}], got {tuple(w.shape)}")
    if q_weight is not None and not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps}")


def _rotate(x, cos, sin, is_neox: bool):
    rot, rest = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        turned = torch.cat((-x2, x1), dim=-1)
    else:
        turned = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((rot * cos + turned * sin, rest), dim=-1)


def widened(table: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """A half-width table [T, R/2] as the full-width one [T, R]: each rotated column's angle."""
    return torch.cat((table, table), -1) if is_neox else table.repeat_interleave(2, -1)


def reference(q, k, q_weight, k_weight, cos, sin, eps: float, norm_offset: float, is_neox: bool,
              float_math: bool = False, half_width: bool = False,
              weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The definition of correct, in plain torch (the HF modules' formulation)."""
    if half_width:
        cos, sin = widened(cos, is_neox), widened(sin, is_neox)
    if float_math:
        q_out, k_out = reference(q.float(), k.float(), q_weight, k_weight, cos, sin, eps, norm_offset, is_neox, False,
                                 False, weight_in_float)
        return q_out.to(q.dtype), k_out.to(k.dtype)
    if q_weight is not None:
        q = _rms_norm_head(q, q_weight, eps, norm_offset, weight_in_float)
        k = _rms_norm_head(k, k_weight, eps, norm_offset, weight_in_float)
    return _rotate(q, cos, sin, is_neox).contiguous(), _rotate(k, cos, sin, is_neox).contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [T, H*D] with unit column stride and heads D apart (a copy only when needed)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x.as_strided((x.shape[0], x.shape[1] * x.shape[2]), (x.stride(0), 1))


def triton_impl(q, k, q_weight, k_weight, cos, sin, eps: float, norm_offset: float, is_neox: bool,
                float_math: bool = False, half_width: bool = False, weight_in_float: bool = False):
    T, nq, D = q.shape
    nkv = k.shape[1]
    q_out, k_out = q.new_empty(T, nq * D), q.new_empty(T, nkv * D)
    rot = cos.shape[1] * (2 if half_width else 1)
    # The kernel reads both at one offset.  Columns apart (a complex table's parts) only in float32: 16-bit
    # tables read 2 apart came out up to one ulp off on the H200 (600 of 640 elements; fp32 bit-exact, cause
    # not found, benchmarks/NOTES.md v28), so they are copied as before.
    if rot and (cos.stride() != sin.stride() or (cos.stride(1) != 1 and cos.dtype != torch.float32)):
        cos, sin = cos.contiguous(), sin.contiguous()
    launch_norm_rope(_rows(q), _rows(k), q, None if q_weight is None else q_weight.contiguous(),
                     None if k_weight is None else k_weight.contiguous(), cos, sin, None, q_out, k_out,
                     q.new_empty(T, 0), num_tokens=T, q_head_stride=D, head_dim=D, rotary_dim=rot, eps=eps,
                     norm_offset=norm_offset, is_neox=is_neox, full_width_cos=not half_width, float_math=float_math,
                     weight_in_float=weight_in_float)
    return q_out.view(T, nq, D), k_out.view(T, nkv, D)


@torch.library.custom_op("kunlun::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                 norm_offset: float, is_neox: bool, float_math: bool = False,
                 half_width: bool = False, weight_in_float: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    check_args(q, k, q_weight, k_weight, cos, sin, eps, half_width)
    args = (q, k, q_weight, k_weight, cos, sin, eps, norm_offset, is_neox, float_math, half_width, weight_in_float)
    return triton_impl(*args) if use_triton(q) else reference(*args)


@qk_norm_rope.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, norm_offset, is_neox, float_math=False, half_width=False,
      weight_in_float=False):
    check_args(q, k, q_weight, k_weight, cos, sin, eps, half_width)
    return q.new_empty(q.shape), k.new_empty(k.shape)
