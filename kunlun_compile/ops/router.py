"""kunlun::router — the primitive "score the experts, pick the top k, weight each pick" that model code spells
in many ways (vLLM's `select_experts`, HF's `TopKRouter`, DeepSeek's grouped sigmoid router, the top-k taken
before the softmax, an unsorted top-k, a bias that only steers the choice).  The router rules
(`passes/rules/moe_gate.py`) turn each spelling into this one node and fold a renormalisation and a scale
written after it into its parameters; a node the `kunlun::moe_gate` kernel can run becomes that kernel, any
other is put back as its reference, so a graph never keeps it.

    scores  = softmax(logits) or sigmoid(logits), in float32, over the last dim (the E experts)
    choice  = scores + bias (the bias steers the choice only)
    groups  (num_groups > 1): a group's score is the sum of its top 2 choices with a bias, else its max;
            experts outside the best `topk_group` groups are not chosen
    ids     = top-k of choice (int64, best first: one valid order of an unsorted top-k)
    weights = scores at ids, / their sum if `renormalize`, x `scale`            (float32)

Unlike `kunlun::moe_gate` (vLLM's contract: [M, E] logits, int32 ids) the primitive keeps the model's own
types: any leading dims, the int64 ids `topk` returns.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

SCORING = ("softmax", "sigmoid")


def _known(condition) -> bool:
    return bool(statically_known_true(condition))


def check_args(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, scoring: str, num_groups: int,
               topk_group: int) -> None:
    """Refuses what is known to be wrong, without guarding on symbolic sizes (these run inside the passes)."""
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"router: logits must be a float tensor [..., E], got {tuple(logits.shape)} {logits.dtype}")
    if scoring not in SCORING:
        raise ValueError(f"router: scoring must be one of {SCORING}, got {scoring!r}")
    experts = logits.shape[-1]
    if num_groups < 1 or _known(experts % num_groups != 0):
        raise ValueError(f"router: num_groups={num_groups} must divide the {experts} experts")
    if num_groups > 1 and not 1 <= topk_group <= num_groups:
        raise ValueError(f"router: topk_group={topk_group} must be in [1, num_groups={num_groups}]")
    kept = experts if num_groups == 1 else topk_group * (experts // num_groups)
    if top_k < 1 or _known(top_k > kept):
        raise ValueError(f"router: top_k={top_k} must be in [1, {kept}] (experts that can be chosen)")
    if bias is not None and (not bias.is_floating_point() or _known(bias.numel() != experts)):
        raise ValueError(f"router: the bias must be {experts} floats, got {tuple(bias.shape)} {bias.dtype}")


def group_mask(choice: torch.Tensor, biased: bool, num_groups: int, topk_group: int) -> torch.Tensor:
    """True for the experts of the best `topk_group` groups."""
    grouped = choice.unflatten(-1, (num_groups, choice.shape[-1] // num_groups))
    group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if biased else grouped.amax(-1)
    best = group_scores.topk(topk_group, dim=-1)[1]
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, best, True)
    return kept.unsqueeze(-1).expand(grouped.shape).flatten(-2)


def reference(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, scoring: str, num_groups: int,
              topk_group: int, renormalize: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    scores = torch.softmax(logits.float(), dim=-1) if scoring == "softmax" else logits.float().sigmoid()
    choice = scores if bias is None else scores + bias.float().reshape(scores.shape[-1])
    if num_groups > 1:
        choice = choice.masked_fill(~group_mask(choice, bias is not None, num_groups, topk_group), float("-inf"))
    if choice is scores:
        weights, ids = scores.topk(top_k, dim=-1)
    else:
        ids = choice.topk(top_k, dim=-1)[1]
        weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    return weights, ids


@torch.library.custom_op("kunlun::router", mutates_args=())
def router(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, scoring: str, num_groups: int,
           topk_group: int, renormalize: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    check_args(logits, bias, top_k, scoring, num_groups, topk_group)
    weights, ids = reference(logits, bias, top_k, scoring, num_groups, topk_group, renormalize, scale)
    return weights.contiguous(), ids.contiguous()


@router.register_fake
def _(logits, bias, top_k, scoring, num_groups, topk_group, renormalize, scale):
    check_args(logits, bias, top_k, scoring, num_groups, topk_group)
    shape = (*logits.shape[:-1], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int64)
