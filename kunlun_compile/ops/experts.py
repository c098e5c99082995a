"""kunlun::experts — the routed-experts primitive: what every spelling of expert dispatch means.

    out[m] = Σ_j w[m,j] · w2[e] @ (silu(w13[e,:I] @ x[m]) * (w13[e,I:] @ x[m])),   e = ids[m,j]

The meaning of `kunlun::fused_moe` (its `reference`), with the weights taken as the logical [E, 2I, H] and
[E, H, I] tensors whatever their strides: a model that stores them [E, K, N] (`torch._grouped_mm`'s layout) is
recognised with a transposed view, which the kernel reads in place.  The expert-dispatch rules
(`passes/rules/moe_experts.py`) turn each spelling into this node; the fuse stage makes it `fused_moe`, and
what nothing fused is put back in the gather form (`moe_experts.gather_experts`: static shapes, no host read,
so a CUDA graph can hold it).  Called directly it runs the reference, which reads the ids on the host.
"""
from __future__ import annotations

import torch

from . import fused_moe


@torch.library.custom_op("kunlun::experts", mutates_args=())
def experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, activation: str) -> torch.Tensor:
    fused_moe.check_args(x, w13, w2, topk_weights, topk_ids, activation)
    fused_moe.check_ids_in_range(topk_ids, w13.shape[0])
    return fused_moe.reference(x, w13, w2, topk_weights, topk_ids, activation)


@experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids, activation):
    fused_moe.check_args(x, w13, w2, topk_weights, topk_ids, activation)
    return x.new_empty(x.shape)
