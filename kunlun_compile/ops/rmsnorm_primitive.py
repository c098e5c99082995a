"""kunlun::rmsnorm_primitive — the primitive "RMS-normalise each row, then scale by a weight" that model code
spells in many ways: vLLM's `x.to(orig) * w`, HF's `w * x.to(dtype)`, Olmo2's `(w * x).to(dtype)`, Gemma's
`x * (1 + w.float())`, torch's `F.rms_norm` / `nn.RMSNorm`, `pow(2).mean` or `x * x` summed and divided,
`1 / sqrt` or `rsqrt`, Llama4's weightless L2 norm.  The norm rules (`passes/rules/norms.py`) turn each
spelling into this one node, with the spelling's rounding in its parameters; fusing rules take it (with the
residual add before it into kunlun::fused_add_rmsnorm, with the rotation after it into the prologue ops,
alone into kunlun::rms_norm); whatever is left is put back as its reference, so a graph never keeps it.

    normed = x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)
    weight_in_float or norm_offset != 0:  out = (normed * (weight.float() + norm_offset)).to(x.dtype)
    otherwise:                            out = normed.to(x.dtype) * weight      (weight in x's dtype)

`weight` None is a weight of ones (nothing multiplies).  The reference is kunlun::rms_norm's, to the bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import add_rmsnorm


def check_args(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> None:
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"rmsnorm_primitive: x must be a float tensor, got {x.dtype} of {x.dim()} dims")
    if weight is not None and (weight.dim() != 1 or not weight.is_floating_point()):
        raise ValueError(f"rmsnorm_primitive: weight must be a float vector, got {tuple(weight.shape)} {weight.dtype}")
    if not eps > 0:
        raise ValueError(f"rmsnorm_primitive: eps must be > 0, got {eps}")


def reference(x, weight, eps: float, norm_offset: float, weight_in_float: bool) -> torch.Tensor:
    if weight is None:
        weight = x.new_ones(x.shape[-1])
    return add_rmsnorm.reference(x, None, weight, eps, norm_offset, weight_in_float=weight_in_float)[0]


@torch.library.custom_op("kunlun::rmsnorm_primitive", mutates_args=())
def rmsnorm_primitive(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, norm_offset: float,
                      weight_in_float: bool) -> torch.Tensor:
    check_args(x, weight, eps)
    return reference(x, weight, eps, norm_offset, weight_in_float).contiguous()


@rmsnorm_primitive.register_fake
def _(x, weight, eps, norm_offset, weight_in_float):
    check_args(x, weight, eps)
    return x.new_empty(x.shape)
