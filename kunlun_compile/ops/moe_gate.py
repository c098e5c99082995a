"""kunlun::moe_gate — router scores → top-k experts, one program per token.

    scores  = softmax(logits) or sigmoid(logits), fp32
    choice  = scores + correction_bias (DeepSeek-V3; the bias only steers the choice)
    groups  (num_groups > 1): group score = sum of the top-2 choice scores of the
            group with a bias, else the group max; keep the best `topk_group` groups
    ids     = top-k of `choice` among the kept experts, best first, ties to the lower index
    weights = scores[ids] (unbiased), / their sum if `renormalize`, × routed_scaling_factor

Returns fp32 weights [M, k] and int32 ids [M, k], as vLLM's `select_experts`.  Ids are always in
[0, E): a row whose scores are NaN gets NaN weights (and in-range ids), never an id past the experts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..triton_kernel import kernel, use_triton, wait_for_producers

SCORING = ("softmax", "sigmoid")


def check_args(router_logits, top_k, scoring, num_groups, topk_group, correction_bias) -> None:
    name = "moe_gate"
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"{name}: router_logits must be a 2-D float tensor [M, E], got "
                         f"{tuple(router_logits.shape)} {router_logits.dtype}")
    E = router_logits.shape[1]
    if scoring not in SCORING:
        raise ValueError(f"{name}: scoring must be one of {SCORING}, got {scoring!r}")
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"{name}: num_groups={num_groups} must divide the {E} experts")
    if num_groups > 1 and not 1 <= topk_group <= num_groups:
        raise ValueError(f"{name}: topk_group={topk_group} must be in [1, num_groups={num_groups}]")
    kept = E if num_groups == 1 else topk_group * (E // num_groups)
    if not 1 <= top_k <= kept:
        raise ValueError(f"{name}: top_k={top_k} must be in [1, {kept}] (experts that can be chosen)")
    if correction_bias is not None and tuple(correction_bias.shape) != (E,):
        raise ValueError(f"{name}: correction_bias must be [{E}], got {tuple(correction_bias.shape)}")


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, best first, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True)[1][..., :k]


def reference(router_logits, top_k: int, scoring: str, renormalize: bool, num_groups: int, topk_group: int,
              correction_bias: Optional[torch.Tensor], routed_scaling_factor: float):
    """The definition of correct, in plain torch."""
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    if num_groups > 1:
        M, E = choice.shape
        grouped = choice.view(M, num_groups, E // num_groups)
        if correction_bias is not None:
            group_scores = grouped.gather(-1, _top(grouped, 2)).sum(-1)
        else:
            group_scores = grouped.amax(-1)
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, _top(group_scores, topk_group), True)
        choice = choice.masked_fill(~kept.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = _top(choice, top_k)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routed_scaling_factor, ids.to(torch.int32)


@kernel
def _moe_gate_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, logits_stride, scale,
                     E: tl.constexpr, TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
                     HAS_BIAS: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     BG: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    # the E experts of one token as a [BG groups, BE experts per group] block (G == 1: one group)
    row = tl.program_id(0).to(tl.int64)
    PER: tl.constexpr = E // G
    g = tl.arange(0, BG)
    j = tl.arange(0, BE)
    expert = g[:, None] * PER + j[None, :]
    valid = (g[:, None] < G) & (j[None, :] < PER)
    x = tl.load(logits_ptr + row * logits_stride + expert, mask=valid, other=-float("inf")).to(tl.float32)
    if SOFTMAX:
        e = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        scores = e / tl.sum(tl.sum(e, axis=1), axis=0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-x))
    scores = tl.where(valid, scores, 0.0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, -float("inf"))
    BIG: tl.constexpr = BG * BE

    if G > 1:
        best = tl.max(choice, axis=1)
        if HAS_BIAS:  # sum of the top two: remove the first occurrence of the max, take the max again
            first = tl.min(tl.where(choice == best[:, None], j[None, :], BE), axis=1)
            second = tl.max(tl.where(j[None, :] == first[:, None], -float("inf"), choice), axis=1)
            group_score = best + second
        else:
            group_score = best
        group_score = tl.where(g < G, group_score, -float("inf"))
        kept = g < 0
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, axis=0)
            pick = tl.min(tl.where(group_score == top, g, BG), axis=0)
            kept = kept | (g == pick)
            group_score = tl.where(g == pick, -float("inf"), group_score)
        choice = tl.where(kept[:, None], choice, -float("inf"))

    k = tl.arange(0, BK)  # BK: TOP_K padded to a power of two; the padding stays 0
    out_w = tl.zeros([BK], dtype=tl.float32)
    out_i = tl.zeros([BK], dtype=tl.int32)
    for s in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        pick = tl.min(tl.min(tl.where(choice == top, expert, BIG), axis=1), axis=0)
        hit = expert == pick
        weight = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=0)
        # NaN scores match no maximum: keep the id in range (expert 0) and make the weight say NaN
        matched = pick < E
        out_w = tl.where(k == s, tl.where(matched, weight, float("nan")), out_w)
        out_i = tl.where(k == s, tl.where(matched, pick, 0), out_i)
        choice = tl.where(hit, -float("inf"), choice)
    if RENORM:
        out_w = out_w / tl.sum(out_w, axis=0)
    tl.store(w_ptr + row * TOP_K + k, out_w * scale, mask=k < TOP_K)
    tl.store(ids_ptr + row * TOP_K + k, out_i, mask=k < TOP_K)


def triton_impl(router_logits, top_k: int, scoring: str, renormalize: bool, num_groups: int, topk_group: int,
                correction_bias: Optional[torch.Tensor], routed_scaling_factor: float):
    M, E = router_logits.shape
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    weights = torch.empty(M, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(M, top_k, dtype=torch.int32, device=logits.device)
    if M:
        bias = correction_bias.contiguous() if correction_bias is not None else weights
        _moe_gate_kernel.on(logits.device)[(M,)](
            logits, bias, weights, ids, logits.stride(0), routed_scaling_factor,
            E=E, TOP_K=top_k, SOFTMAX=scoring == "softmax", RENORM=renormalize,
            HAS_BIAS=correction_bias is not None, G=num_groups, TOPK_GROUP=topk_group,
            BG=triton.next_power_of_2(num_groups), BE=triton.next_power_of_2(E // num_groups),
            BK=triton.next_power_of_2(top_k), num_warps=4 if E >= 256 else 1)
    return weights, ids


@torch.library.custom_op("kunlun::moe_gate", mutates_args=())
def moe_gate(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, num_groups: int,
             topk_group: int, correction_bias: Optional[torch.Tensor],
             routed_scaling_factor: float) -> Tuple[torch.Tensor, torch.Tensor]:
    check_args(router_logits, top_k, scoring, num_groups, topk_group, correction_bias)
    args = (router_logits, top_k, scoring, renormalize, num_groups, topk_group, correction_bias,
            routed_scaling_factor)
    if use_triton(router_logits):
        return triton_impl(*args)
    return reference(*args)


@moe_gate.register_fake
def _(router_logits, top_k, scoring, renormalize, num_groups, topk_group, correction_bias, routed_scaling_factor):
    check_args(router_logits, top_k, scoring, num_groups, topk_group, correction_bias)
    M = router_logits.shape[0]
    return (router_logits.new_empty(M, top_k, dtype=torch.float32),
            router_logits.new_empty(M, top_k, dtype=torch.int32))
