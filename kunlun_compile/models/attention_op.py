"""The built-in models' attention: one custom op, so the runtime can split on it.

`kunlun_models::attention(q, k, v, mask, ...)` is causal/sliding/padded
attention over the tokens of one sequence, with the additive mask built by the
model code (which is what the `attention_mask` pattern family matches).  It is
a splitting op for piecewise capture, as vLLM's `unified_attention` is.  On
CUDA it is one Triton kernel (attention_kernel.py), as a serving engine's
attention backend is; elsewhere the torch reference below runs.
"""
from __future__ import annotations

import torch

ATTENTION_OP_NAME = "kunlun_models::attention"


@torch.library.custom_op(ATTENTION_OP_NAME, mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """q [T, nq*D], k/v [T, nkv*D], mask [T, T] additive -> [T, nq*D]; softmax in fp32."""
    if q.is_cuda:
        from .attention_kernel import attention_triton

        return attention_triton(q, k, v, mask, num_heads, num_kv_heads, head_dim, scale)
    return attention_reference(q, k, v, mask, num_heads, num_kv_heads, head_dim, scale)


def attention_reference(q, k, v, mask, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    """The definition of correct, in plain torch."""
    T = q.shape[0]
    qh = q.view(T, num_heads, head_dim).transpose(0, 1).float()
    kh = k.view(T, num_kv_heads, head_dim).transpose(0, 1).float()
    vh = v.view(T, num_kv_heads, head_dim).transpose(0, 1).float()
    group = num_heads // num_kv_heads
    kh = kh.repeat_interleave(group, dim=0)
    vh = vh.repeat_interleave(group, dim=0)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale + mask.float()
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)
    return out.transpose(0, 1).reshape(T, num_heads * head_dim).to(q.dtype)


@attention.register_fake
def _(q, k, v, mask, num_heads, num_kv_heads, head_dim, scale):
    return q.new_empty(q.shape[0], num_heads * head_dim)
