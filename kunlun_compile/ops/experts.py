"""kunlun::experts — the routed-experts primitive: what every spelling of expert dispatch means.

    out[m] = Σ_j w[m,j] · (w2[e] @ act(w13[e] @ x[m] + b13[e]) + b2[e]),   e = ids[m,j]   (biases optional)

The meaning of `kunlun::fused_moe` (its `reference`), with the weights taken as the logical [E, 2I, H] and
[E, H, I] tensors whatever their strides: a model that stores them [E, K, N] (`torch._grouped_mm`'s layout) is
recognised with a transposed view, which the kernel reads in place.  The expert-dispatch rules
(`passes/rules/moe_experts.py`) turn each spelling into this node; the fuse stage makes it `fused_moe`, and
what nothing fused is put back in the gather form (`moe_experts.gather_experts`: static shapes, no host read,
so a CUDA graph can hold it).  Called directly it runs the reference, which reads the ids on the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import fused_moe


@torch.library.custom_op("kunlun::experts", mutates_args=())
def experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, activation: str, b13: Optional[torch.Tensor] = None,
            b2: Optional[torch.Tensor] = None, alpha: float = 0.0, limit: float = 0.0) -> torch.Tensor:
    fused_moe.check_args(x, w13, w2, topk_weights, topk_ids, activation, b13, b2, alpha, limit)
    fused_moe.check_ids_in_range(topk_ids, w13.shape[0])
    return fused_moe.reference(x, w13, w2, topk_weights, topk_ids, activation, b13, b2, alpha, limit)


@experts.register_fake
def _(x, w13, w2, topk_weights, topk_ids, activation, b13=None, b2=None, alpha=0.0, limit=0.0):
    fused_moe.check_args(x, w13, w2, topk_weights, topk_ids, activation, b13, b2, alpha, limit)
    return x.new_empty(x.shape)
