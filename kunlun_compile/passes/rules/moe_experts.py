"""moe_ffn: the routed experts' computation -> kunlun::fused_moe.

Forms matched (each the way the model code writes it):
- gather form (vLLM-style reference experts; the built-in models): each token's
  k experts' weights are gathered and applied with einsum;
- HF transformers `batched_mm` experts (tokens repeated k times, per-pair bmm
  against gathered weights, weighted sum over k);
- HF transformers `grouped_mm` experts, its default: (token, k) pairs sorted by
  expert, `histc(...).cumsum` offsets, two grouped GEMMs (`torch._grouped_mm`,
  or transformers' fallback op in fp32), weights applied in sorted order, pairs
  put back by the inverse permutation and summed over k; also with the expert-parallel sentinel masks
  (`masked_fill` of rows whose id >= E around each GEMM), fused only where the ids are a top-k over the
  E router scores, so no sentinel can occur.
HF's `eager` experts implementation loops over `nonzero()` results: Dynamo breaks
the graph there, so that form never reaches a pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import grouped_mm as grouped_mm_op
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


def _hf_grouped_mm(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, sentinels: bool):
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    experts = gate_up_proj.shape[0]
    # HF casts to float32 on the CPU, to int32 on CUDA: the rule leaves the cast's dtype free
    tokens_per_expert = torch.histc(expert_ids_g.float(), bins=experts, min=0, max=experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    if sentinels:  # expert-parallel sentinel ids (>= experts) zeroed around each GEMM
        sentinel = (expert_ids_g >= experts).unsqueeze(-1)
        selected = selected.masked_fill(sentinel, 0.0)
    proj = torch.ops.kunlun.grouped_mm(selected, gate_up_proj.transpose(-2, -1), offsets)
    if sentinels:
        proj = proj.masked_fill(sentinel, 0.0)
    gate, up = proj.chunk(2, dim=-1)
    proj = F.silu(gate) * up
    proj = torch.ops.kunlun.grouped_mm(proj, down_proj.transpose(-2, -1), offsets)
    if sentinels:
        proj = proj.masked_fill(sentinel, 0.0)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def hf_grouped_mm_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    return _hf_grouped_mm(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, sentinels=False)


def hf_grouped_mm_sentinel_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    """The same with transformers' expert-parallel sentinel masks: always on in transformers 5.17, behind
    `_is_expert_parallel` in 5.24."""
    return _hf_grouped_mm(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, sentinels=True)


_EXACT_FOR_EXPERT_IDS = (torch.float32, torch.float64, torch.int32, torch.int64)


def _grouped_guard(b: Bindings):
    """The wildcard sizes must be the ones the fused op assumes: histc over exactly the experts, pairs
    mapped back to tokens by top-k."""
    verdict = _guard(b, "hidden_states", "gate_up_proj", "down_proj", "top_k_weights", "top_k_index")
    if isinstance(verdict, Refusal):
        return verdict
    experts, k = b.val("gate_up_proj").shape[0], b.val("top_k_index").shape[1]
    (histc,) = b.nodes(aten.histc.default)
    params = dict(zip(("bins", "min", "max"), histc.args[1:]), **histc.kwargs)
    bins, low, high = params.get("bins", 100), params.get("min", 0), params.get("max", 0)
    if not (g.known_equal(bins, experts) and low == 0 and g.known_equal(high, experts - 1)):
        return Refusal(f"expert offsets count {bins} bins over [{low}, {high}], not the {experts} experts")
    # the rule leaves every cast's dtype free: the one before histc must count ids exactly, any other
    # (the weighted sum's cast back) must give the hidden states' dtype, which the fused op returns
    for cast in b.nodes(aten._to_copy.default):
        dtype = cast.kwargs.get("dtype")
        if cast is histc.args[0] and dtype not in _EXACT_FOR_EXPERT_IDS:
            return Refusal(f"expert ids are cast to {dtype} before counting them")
        if cast is not histc.args[0] and dtype != b.val("hidden_states").dtype:
            return Refusal(f"the experts' sum is cast to {dtype}, not to the hidden states' dtype")
    (divide,) = b.nodes(aten.floor_divide.default)
    if not g.known_equal(divide.args[1], k):
        return Refusal(f"sorted pairs map to tokens by // {divide.args[1]}, not by top-k {k}")
    for compare in b.nodes(aten.ge.Scalar):  # the sentinel form: masks must provably select nothing
        if not g.known_equal(compare.args[1], experts):
            return Refusal(f"sentinel mask tests ids >= {compare.args[1]}, not >= the {experts} experts")
        reason = g.topk_indices_over(b.node("top_k_index"), experts)
        if reason:
            return Refusal(f"expert ids may hold sentinels (>= {experts}): {reason}")
    return {}


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


def _inputs(dtype, hf: bool, float_weights: bool = False):
    x = torch.randn(_T, _H, dtype=dtype)
    w13, w2 = torch.randn(_E, 2 * _I, _H, dtype=dtype), torch.randn(_E, _H, _I, dtype=dtype)
    ids = torch.randint(0, _E, (_T, _K), dtype=torch.int64 if hf else torch.int32)
    weights = torch.rand(_T, _K, dtype=dtype if hf and not float_weights else torch.float32)
    return (x, w13, w2, ids, weights) if hf else (x, w13, w2, weights, ids)


_GROUPED = dict(replace=_hf_replace, guard=_grouped_guard, needs=(aten.sort.default, aten.histc.default),
                aliases={torch.ops.kunlun.grouped_mm.default: grouped_mm_op.ALIASES},
                free_arguments=((aten._to_copy.default, "dtype"), (aten.ge.Scalar, 1)))

RULES = [
    Rewrite(family="moe_ffn", name="gather_einsum", search=gather_experts, replace=_gather_replace,
            example_inputs=lambda dtype: _inputs(dtype, hf=False),
            guard=lambda b: _guard(b, "x", "w13", "w2", "topk_weights", "topk_ids"),
            needs=(aten.bmm.default, aten.index.Tensor)),
    Rewrite(family="moe_ffn", name="hf_batched_mm", search=hf_batched_mm_experts, replace=_hf_replace,
            example_inputs=lambda dtype: _inputs(dtype, hf=True),
            guard=lambda b: _guard(b, "hidden_states", "gate_up_proj", "down_proj", "top_k_weights", "top_k_index"),
            needs=(aten.bmm.default, aten.index.Tensor)),
    Rewrite(family="moe_ffn", name="hf_grouped_mm", search=hf_grouped_mm_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True), **_GROUPED),
    # Mixtral's router leaves its weights in float32: the weighted sum promotes and casts back once
    Rewrite(family="moe_ffn", name="hf_grouped_mm_float_weights", search=hf_grouped_mm_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True, float_weights=True), dtypes=(torch.bfloat16,
                                                                                              torch.float16),
            **_GROUPED),
    Rewrite(family="moe_ffn", name="hf_grouped_mm_sentinels", search=hf_grouped_mm_sentinel_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True), **_GROUPED),
    Rewrite(family="moe_ffn", name="hf_grouped_mm_sentinels_float_weights", search=hf_grouped_mm_sentinel_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True, float_weights=True), dtypes=(torch.bfloat16,
                                                                                              torch.float16),
            **_GROUPED),
]
