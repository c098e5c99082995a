"""moe_ffn: the routed experts' computation -> kunlun::fused_moe.

Forms matched (each the way the model code writes it):
- gather form (vLLM-style reference experts; the built-in models): each token's
  k experts' weights are gathered and applied with einsum;
- HF transformers `batched_mm` experts (tokens repeated k times, per-pair bmm
  against gathered weights, weighted sum over k).
HF's default `eager` experts loop over `nonzero()` results: Dynamo breaks the
graph there, so that form never reaches a pass (select `batched_mm`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g

aten = torch.ops.aten
_T, _H, _I, _E, _K = 5, 24, 12, 7, 3


# vLLM-style gather form.  The rule owns the spelling it matches; the built-in models import it from here
# (models/layers.py `experts_forward`), so editing a demo model changes nothing here.
def gather_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> torch.Tensor:
    """Routed experts, gather form: each token's k experts' weights are gathered and applied.

    w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I].  Capturable (no host sync).
    """
    ids = topk_ids.long()
    h = torch.einsum("th,tkih->tki", x, w13[ids])
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) * up
    out = torch.einsum("tki,tkhi->tkh", act, w2[ids])
    return (out * topk_weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


def hf_batched_mm_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    selected = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    proj = torch.bmm(gate_up_proj[expert_ids], selected.unsqueeze(-1)).squeeze(-1)
    gate, up = proj.chunk(2, dim=-1)
    proj = F.silu(gate) * up
    proj = torch.bmm(down_proj[expert_ids], proj.unsqueeze(-1)).squeeze(-1)
    weighted = proj * sample_weights.unsqueeze(-1)
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _guard(b: Bindings, x: str, w13: str, w2: str, weights: str, ids: str):
    xv, w13v, w2v, wv, iv = (b.val(n) for n in (x, w13, w2, weights, ids))
    reason = g.first(
        g.float_dtype(xv, "hidden states"),
        None if xv.dim() == 2 else f"hidden states are {xv.dim()}-D, the op takes [M, H]",
        None if w13v.dim() == 3 and w2v.dim() == 3 else "expert weights are not [E, rows, cols]",
        g.same_dtype(xv, w13v, "hidden states and w13"), g.same_dtype(xv, w2v, "hidden states and w2"),
        None if iv.dtype in (torch.int32, torch.int64) and iv.dim() == 2 else f"expert ids {iv.dtype} {iv.dim()}-D",
        None if wv.is_floating_point() else f"routing weights are {wv.dtype}",
    )
    if not reason:
        e, two_i, h = w13v.shape
        if not (g.known_equal(h, xv.shape[1]) and two_i % 2 == 0 and tuple(w2v.shape) == (e, h, two_i // 2)):
            reason = f"expert weight shapes {tuple(w13v.shape)}, {tuple(w2v.shape)} do not fit hidden {xv.shape[1]}"
    return Refusal(reason) if reason else {}


def _gather_replace(x, w13, w2, topk_weights, topk_ids):
    return torch.ops.kunlun.fused_moe(x, w13, w2, topk_weights.float(), topk_ids, "silu")


def _hf_replace(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    return torch.ops.kunlun.fused_moe(hidden_states, gate_up_proj, down_proj, top_k_weights.float(), top_k_index,
                                      "silu")


def _inputs(dtype, hf: bool):
    x = torch.randn(_T, _H, dtype=dtype)
    w13, w2 = torch.randn(_E, 2 * _I, _H, dtype=dtype), torch.randn(_E, _H, _I, dtype=dtype)
    ids = torch.randint(0, _E, (_T, _K), dtype=torch.int64 if hf else torch.int32)
    weights = torch.rand(_T, _K, dtype=dtype if hf else torch.float32)
    return (x, w13, w2, ids, weights) if hf else (x, w13, w2, weights, ids)


RULES = [
    Rewrite(family="moe_ffn", name="gather_einsum", search=gather_experts, replace=_gather_replace,
            example_inputs=lambda dtype: _inputs(dtype, hf=False),
            guard=lambda b: _guard(b, "x", "w13", "w2", "topk_weights", "topk_ids"),
            needs=(aten.bmm.default, aten.index.Tensor)),
    Rewrite(family="moe_ffn", name="hf_batched_mm", search=hf_batched_mm_experts, replace=_hf_replace,
            example_inputs=lambda dtype: _inputs(dtype, hf=True),
            guard=lambda b: _guard(b, "hidden_states", "gate_up_proj", "down_proj", "top_k_weights", "top_k_index"),
            needs=(aten.bmm.default, aten.index.Tensor)),
]
