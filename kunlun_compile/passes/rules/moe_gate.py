"""moe_gate: router scores -> top-k -> renormalise -> scale, as kunlun::moe_gate.

Search functions are routers as model code writes them: vLLM's `select_experts`
(softmax or sigmoid; plain, with a correction bias, or DeepSeek-V3 grouped
top-k) and HF transformers' `TopKRouter` (softmax, in-place renormalise, weights
cast back to the logits' dtype, int64 ids).  top_k and group counts are read
back from the matched topk and view nodes.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g

aten = torch.ops.aten
SCALE = 1.7654321  # marker for routed_scaling_factor
NORM_MIN = 2.345e-9  # marker for a renormalisation's clamp
_M, _E, _K, _GROUPS, _TOPK_GROUP = 5, 16, 3, 4, 2


# vLLM's `select_experts` (its fused_moe layer's router).  The rule owns the spelling it matches; the
# built-in models' MoE imports it from here (models/layers.py), so editing a demo model changes nothing here.
def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool, num_groups: int,
                   topk_group: int, correction_bias: Optional[torch.Tensor], routed_scaling_factor: float):
    """Router: softmax/sigmoid -> (grouped) top-k -> renormalise -> scale.  fp32 weights, int32 ids."""
    if scoring == "softmax":
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    else:
        scores = router_logits.float().sigmoid()
    if num_groups > 1:  # DeepSeek-V3: pick groups on biased scores, experts within them
        T, E = scores.shape
        choice = scores + correction_bias.float() if correction_bias is not None else scores
        grouped = choice.view(T, num_groups, E // num_groups)
        if correction_bias is not None:
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_ids)
    elif correction_bias is not None:  # the bias steers the choice; weights stay unbiased
        topk_ids = torch.topk(scores + correction_bias.float(), top_k, dim=-1)[1]
        topk_weights = scores.gather(1, topk_ids)
    else:
        topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def _make_search(scoring: str, grouping: str, renormalize: bool, scaled: bool):
    """grouping: "none", "bias" (top-k on scores + bias), "groups_bias" (DeepSeek-V3), "groups".

    The search is vLLM's `select_experts` (above; the built-in models' router too) at example sizes."""
    groups, topk_group = (_GROUPS, _TOPK_GROUP) if grouping.startswith("groups") else (1, 1)

    def select(logits, bias, scale):
        return select_experts(logits, _K, scoring, renormalize, groups, topk_group, bias,
                              scale if scaled else 1.0)

    if grouping in ("bias", "groups_bias"):
        def search(logits, bias, scale=None):
            return select(logits, bias, scale)
    else:
        def search(logits, scale=None):
            return select(logits, None, scale)
    return search


def hf_router(logits):
    """transformers' Qwen3-MoE / Mixtral-style TopKRouter after its linear layer (norm_topk_prob=True)."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    top_value, indices = torch.topk(probs, _K, dim=-1)
    top_value /= top_value.sum(dim=-1, keepdim=True)
    return top_value.to(logits.dtype), indices


def hf_router_unnormalized(logits):
    """The same with norm_topk_prob=False (the Qwen3-MoE config default)."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    top_value, indices = torch.topk(probs, _K, dim=-1)
    return top_value.to(logits.dtype), indices


def hf_router_float_weights(logits):
    """transformers' Mixtral router: renormalised top-k of a float softmax, the weights left in float32
    (the experts' sum promotes, and casts back once)."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    top_value, indices = torch.topk(probs, _K, dim=-1)
    top_value /= top_value.sum(dim=-1, keepdim=True)
    return top_value, indices


def _hf_grouped_sigmoid_router(groups: int, topk_group: int, renormalize: bool):
    """transformers' DeepSeek-V3 router after its float32 linear (also Glm4-MoE, and Dots1 with one group and
    norm_topk_prob False): grouped sigmoid with the correction bias, renormalised with a 1e-20 guard in the
    denominator, scaled, ids left int64.  One group: the mask's reshape is a view, not a copy, so the graph
    differs.  The replacement keeps the model's renormalisation and scaling as written (see
    `_hf_grouped_replace`)."""

    def hf_grouped_sigmoid_router(logits, bias, scale):
        scores = logits.sigmoid()
        choice = scores + bias
        group_scores = choice.view(-1, groups, _E // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, _E // groups).reshape(-1, _E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=_K, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * scale, ids
    return hf_grouped_sigmoid_router


def hf_greedy_router(logits, scale):
    """transformers' DeepSeek-V2 router (topk_method "greedy") after its float32 linear: softmax, an unsorted
    top-k, scaled, ids int64.  The op's ids come best first: one valid order of an unsorted top-k (the experts
    sum over k, so the order changes nothing but the summation order)."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(scores, k=_K, dim=-1, sorted=False)
    return weights * scale, ids


def hf_softmax_bias_clamped_router(logits, bias, norm_min):
    """Ernie-4.5-MoE after its float32 linear: softmax, top-k on the probabilities plus a correction bias,
    the unbiased probabilities gathered and divided by their sum clamped from below (`moe_norm_min`)."""
    probs = torch.nn.functional.softmax(logits, dim=-1, dtype=torch.float)
    _, ids = torch.topk(probs + bias, _K, dim=-1)
    weights = torch.gather(probs, dim=-1, index=ids)
    return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=norm_min), ids


def hf_topk_then_softmax_router(logits):
    """GraniteMoe: top-k of the float32 logits, softmax over the k chosen ones, weights in the logits' dtype.
    The same weights as a softmax over all experts renormalised over the top k (exp(l_i) / sum over the
    top k of exp(l_j)), the same ids (the softmax keeps the order)."""
    top_k_logits, top_k_index = logits.float().topk(_K, dim=-1)
    return torch.softmax(top_k_logits, dim=-1).type_as(logits), top_k_index


def hf_topk_then_softmax_in_dtype_router(logits):
    """GptOss: the top-k of the logits in their own dtype, a softmax over the k chosen ones in that dtype (eager
    accumulates a half softmax in float32 and rounds once, as the op's weights rounded to the dtype).  In fp32
    this is `hf_topk_then_softmax_router`."""
    top_k_logits, top_k_index = torch.topk(logits, _K, dim=-1)
    return torch.nn.functional.softmax(top_k_logits, dim=-1, dtype=top_k_logits.dtype), top_k_index


def _gate_params(b: Bindings, grouping: str):
    """top_k, num_groups, topk_group from the matched nodes, or a reason."""
    topks = [n for n in b.nodes(aten.topk.default)]
    ks = [n.args[1] for n in topks]
    if not all(isinstance(k, int) for k in ks):
        return "a top-k count is not a constant"
    logits = b.val("logits")
    experts = logits.shape[-1]
    if not isinstance(experts, int):
        return "the expert count is symbolic"
    if not grouping.startswith("groups"):
        return {"top_k": ks[-1], "num_groups": 1, "topk_group": 1}
    views = [n.meta["val"] for n in b.nodes(aten.view.default) if n.meta["val"].dim() == 3]
    if not views:
        return "no [tokens, groups, experts/group] view"
    groups = int(views[0].shape[1])
    # topk order in graph: (group top-2 when biased,) groups kept, experts
    if grouping == "groups_bias" and ks[0] != 2:
        return f"group score is a top-{ks[0]} sum, the op sums the top 2"
    return {"top_k": ks[-1], "num_groups": groups, "topk_group": ks[-2]}


def _guard(b: Bindings, scoring: str, grouping: str, renormalize: bool, scaled: bool):
    logits = b.val("logits")
    params = _gate_params(b, grouping)
    if isinstance(params, str):
        return Refusal(params)
    reason = g.first(g.float_dtype(logits, "router logits"),
                     None if logits.dim() == 2 else f"router logits are {logits.dim()}-D, the op takes [M, E]",
                     g.constant_float(b.scalar("scale"), "routed_scaling_factor") if scaled else None)
    if not reason and grouping in ("bias", "groups_bias"):
        reason = g.vector_of(b.val("bias"), logits.shape[-1], "correction bias")
    if not reason and not 1 <= params["top_k"] <= logits.shape[-1]:
        reason = f"top_k {params['top_k']} for {logits.shape[-1]} experts"
    if reason:
        return Refusal(reason)
    return params


def _replace(*tensors, scoring, grouping, renormalize, scaled, top_k, num_groups, topk_group, scale=1.0):
    logits, bias = (tensors[0], tensors[1]) if grouping in ("bias", "groups_bias") else (tensors[0], None)
    return torch.ops.kunlun.moe_gate(logits, top_k, scoring, renormalize, num_groups, topk_group, bias,
                                     scale if scaled else 1.0)


def _needs(scoring: str, grouping: str, renormalize: bool) -> tuple:
    """Ops each variant's pattern has (tests/test_rule_needs.py checks it): a graph without them
    is not searched, so e.g. a softmax router's graph does not trace the 16 sigmoid variants."""
    return ((aten.topk.default, aten._softmax.default if scoring == "softmax" else aten.sigmoid.default) +
            ((aten.gather.default,) if grouping != "none" else ()) +
            ((aten.scatter.value,) if grouping.startswith("groups") else ()) +
            ((aten.sum.dim_IntList,) if renormalize else ()))


def _rule(scoring, grouping, renormalize, scaled) -> Rewrite:
    name = f"{scoring}_{grouping}{'_renorm' if renormalize else ''}{'_scaled' if scaled else ''}"
    flags = dict(scoring=scoring, grouping=grouping, renormalize=renormalize, scaled=scaled)
    search = _make_search(**flags)
    biased = grouping in ("bias", "groups_bias")

    def inputs(dtype):
        logits = torch.randn(_M, _E, dtype=dtype)
        return (logits, torch.randn(_E, dtype=dtype)) if biased else (logits,)

    return Rewrite(family="moe_gate", name=name, search=search,
                   replace=lambda *t, **p: _replace(*t, **flags, **p),
                   example_inputs=inputs, constants={"scale": SCALE} if scaled else {},
                   guard=lambda b: _guard(b, **flags), needs=_needs(scoring, grouping, renormalize))


_HF_SEARCHES = {"": hf_router, "_unnormalized": hf_router_unnormalized, "_float_weights": hf_router_float_weights}


def _hf_rule(variant: str) -> Rewrite:
    renormalize = variant != "_unnormalized"
    float_weights = variant == "_float_weights"

    def replace(logits, *, top_k, num_groups, topk_group):
        weights, ids = torch.ops.kunlun.moe_gate(logits, top_k, "softmax", renormalize, 1, 1, None, 1.0)
        return (weights if float_weights else weights.to(logits.dtype)), ids.long()

    # in fp32 the float-weights form is the plain one: traced only where they differ
    dtypes = (torch.bfloat16, torch.float16) if float_weights else (torch.float32, torch.bfloat16, torch.float16)
    return Rewrite(family="moe_gate", name="hf_topk_router" + variant, search=_HF_SEARCHES[variant],
                   replace=replace, example_inputs=lambda dtype: (torch.randn(_M, _E, dtype=dtype),), dtypes=dtypes,
                   guard=lambda b: _guard(b, "softmax", "none", renormalize, False),
                   needs=_needs("softmax", "none", renormalize))


def _topk_then_softmax_replace(logits, *, top_k, num_groups, topk_group):
    weights, ids = torch.ops.kunlun.moe_gate(logits, top_k, "softmax", True, 1, 1, None, 1.0)
    return weights.to(logits.dtype), ids.long()


_TOPK_THEN_SOFTMAX = Rewrite(family="moe_gate", name="hf_topk_then_softmax_router", search=hf_topk_then_softmax_router,
                             replace=_topk_then_softmax_replace,
                             example_inputs=lambda dtype: (torch.randn(_M, _E, dtype=dtype),),
                             guard=lambda b: _guard(b, "softmax", "none", True, False),
                             needs=(aten.topk.default, aten._softmax.default))


_TOPK_THEN_SOFTMAX_IN_DTYPE = Rewrite(
    family="moe_gate", name="hf_topk_then_softmax_in_dtype_router", search=hf_topk_then_softmax_in_dtype_router,
    replace=_topk_then_softmax_replace, example_inputs=lambda dtype: (torch.randn(_M, _E, dtype=dtype),),
    dtypes=(torch.bfloat16, torch.float16), guard=lambda b: _guard(b, "softmax", "none", True, False),
    needs=(aten.topk.default, aten._softmax.default))


def _renormalized(weights, denominator_guard: float = 0.0, norm_min: float = None):
    """The model's own renormalisation, kept outside the op so the result is the model's to the bit: the op
    cannot hold every denominator guard (`+ 1e-20`, a clamp) models write."""
    total = weights.sum(dim=-1, keepdim=True)
    if norm_min is not None:
        return weights / torch.clamp(total, min=norm_min)
    return weights / (total + denominator_guard)


def _hf_grouped_replace(renormalize: bool):
    def replace(logits, bias, *, scale, **params):
        weights, ids = _replace(logits, bias, scoring="sigmoid", grouping="groups_bias", renormalize=False,
                                scaled=False, **params)
        if renormalize:
            weights = _renormalized(weights, denominator_guard=1e-20)
        return weights * scale, ids.long()
    return replace


def _hf_greedy_replace(logits, *, scale, top_k, num_groups, topk_group):
    weights, ids = torch.ops.kunlun.moe_gate(logits, top_k, "softmax", False, 1, 1, None, 1.0)
    return weights * scale, ids.long()


def _hf_clamped_replace(logits, bias, *, norm_min, top_k, num_groups, topk_group):
    weights, ids = torch.ops.kunlun.moe_gate(logits, top_k, "softmax", False, 1, 1, bias, 1.0)
    return _renormalized(weights, norm_min=norm_min), ids.long()


def _scale_guard(b: Bindings, name: str, scoring: str, grouping: str):
    params = _guard(b, scoring, grouping, False, False)
    if isinstance(params, Refusal):
        return params
    reason = g.constant_float(b.scalar(name), name)
    return Refusal(reason) if reason else params


def _float32_inputs(biased: bool):
    """These routers run in float32 whatever the model's dtype: one pattern, tried in every graph."""
    return lambda dtype: (torch.randn(_M, _E), torch.randn(_E)) if biased else (torch.randn(_M, _E),)


_HF_FLOAT32_ROUTERS = [
    Rewrite(family="moe_gate", name=f"hf_grouped_sigmoid_router_{groups}_groups{'' if renorm else '_unnormalized'}",
            search=_hf_grouped_sigmoid_router(groups, topk_group, renorm), replace=_hf_grouped_replace(renorm),
            example_inputs=_float32_inputs(True), constants={"scale": SCALE},
            guard=lambda b: _scale_guard(b, "scale", "sigmoid", "groups_bias"),
            needs=_needs("sigmoid", "groups_bias", renorm))
    for (groups, topk_group), renorm in itertools.product(((_GROUPS, _TOPK_GROUP), (1, 1)), (True, False))
] + [
    Rewrite(family="moe_gate", name="hf_greedy_router", search=hf_greedy_router, replace=_hf_greedy_replace,
            example_inputs=_float32_inputs(False), constants={"scale": SCALE},
            guard=lambda b: _scale_guard(b, "scale", "softmax", "none"), needs=_needs("softmax", "none", False)),
    Rewrite(family="moe_gate", name="hf_softmax_bias_clamped_router", search=hf_softmax_bias_clamped_router,
            replace=_hf_clamped_replace, example_inputs=_float32_inputs(True), constants={"norm_min": NORM_MIN},
            guard=lambda b: _scale_guard(b, "norm_min", "softmax", "bias"),
            needs=_needs("softmax", "bias", True) + (aten.clamp.default,)),
]

_COMBOS = [("softmax", "none"), ("sigmoid", "none"), ("softmax", "bias"), ("sigmoid", "bias"),
           ("sigmoid", "groups_bias"), ("softmax", "groups"), ("sigmoid", "groups")]
RULES = [_rule(s, grp, renorm, scaled)
         for (s, grp), renorm, scaled in itertools.product(_COMBOS, (True, False), (False, True))] + \
    [_hf_rule(v) for v in _HF_SEARCHES] + [_TOPK_THEN_SOFTMAX, _TOPK_THEN_SOFTMAX_IN_DTYPE, *_HF_FLOAT32_ROUTERS]
