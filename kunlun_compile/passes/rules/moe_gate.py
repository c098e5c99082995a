"""moe_gate: every spelling of a router -> the `kunlun::router` primitive -> kunlun::moe_gate.

Stage one (`RECOGNISE`) has one small rule per way a model picks its experts: the top-k of the scores
(sorted or not), the top-k of the scores plus a bias with the unbiased scores gathered, DeepSeek's
group-limited top-k, the top-k of the logits with a softmax over the k chosen.  Scoring (softmax or sigmoid, in
float32) is a parameter of each.  `WIDEN` folds what a model writes after the choice into the primitive: the
renormalisation (`w / w.sum(-1, keepdim=True)`) and a constant scale.  A renormalisation with a guard in its
denominator (`+ 1e-20`, a clamp) stays as the model wrote it, after the primitive.  `FUSE` turns every
primitive into the `kunlun::moe_gate` kernel (flattening leading dims, int64 ids as `topk` gives them), and
`LOWER` puts back what nothing fused as its reference (`ops/router.py`), with a near miss.  A new spelling is
one more search function below, not one more variant of every renormalisation and scale.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.fx as fx

from ...ops.router import reference
from ..explain_anchors import val
from ..pattern_engine import Bindings, Refusal, Rewrite
from ..rewrites import MADE_BY, REFUSED, REPLACES
from . import guards as g

aten = torch.ops.aten
ROUTER = torch.ops.kunlun.router.default
SCALE = 1.7654321  # marker for routed_scaling_factor
_M, _E, _K, _GROUPS, _TOPK_GROUP = 5, 16, 3, 4, 2


# vLLM's `select_experts` (its fused_moe layer's router): the built-in models' router (models/layers.py imports
# it), and the spelling the grouped search below is written after.
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


# ---- stage one: how a model picks its experts ----------------------------------------------------------

def _scores(logits, scoring: str):
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    return logits.float().sigmoid()


def _top_of_scores(scoring: str):
    """The top-k of the scores, their values the weights (vLLM, HF's TopKRouter; DeepSeek-V2's unsorted
    "greedy" top-k: every rule leaves `sorted` free, best first is one valid order)."""
    def search(logits):
        return torch.topk(_scores(logits, scoring), _K, dim=-1)
    return search


def _steered(scoring: str):
    """The top-k of the scores plus a bias that only steers the choice, the unbiased scores gathered (vLLM's
    correction bias, Ernie-4.5)."""
    def search(logits, bias):
        scores = _scores(logits, scoring)
        ids = torch.topk(scores + bias.float(), _K, dim=-1)[1]
        return scores.gather(-1, ids), ids
    return search


def _kept(group_scores, groups: int, topk_group: int):
    """[tokens, experts] True for the experts of the best `topk_group` groups, as both vLLM routers build it:
    a 0/1 float mask scattered per group, broadcast to the group's experts."""
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(-1, groups, _E // groups).reshape(-1, _E).bool()


def _grouped(scoring: str, biased: bool, groups: int, topk_group: int):
    """DeepSeek-V3's group-limited top-k as vLLM (`select_experts`) and transformers write it: a group scores
    the sum of its top 2 (with a bias) or its max, experts outside the best groups are masked to -inf.  One
    group (Dots1): the mask's reshape is a view, not a copy, so the graph differs."""
    def choose(scores, choice):
        grouped = choice.view(-1, groups, _E // groups)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if biased else grouped.amax(dim=-1)
        choice = choice.masked_fill(~_kept(group_scores, groups, topk_group), float("-inf"))
        ids = torch.topk(choice, k=_K, dim=-1, sorted=False)[1]
        return scores.gather(1, ids), ids

    if biased:
        def search(logits, bias):
            scores = _scores(logits, scoring)
            return choose(scores, scores + bias.float())
    else:
        def search(logits):
            scores = _scores(logits, scoring)
            return choose(scores, scores)
    return search


def _grouped_values(scoring: str, groups: int, topk_group: int):
    """vLLM's CPU router, grouped without a bias: a group scores its max (`max(dim).values`), the top-k values
    of the masked scores are the weights (no gather)."""
    def search(logits):
        scores = _scores(logits, scoring)
        group_scores = scores.view(-1, groups, _E // groups).max(dim=-1).values
        return torch.topk(scores.masked_fill(~_kept(group_scores, groups, topk_group), float("-inf")), k=_K, dim=-1,
                          sorted=False)
    return search


def _top_then_exp_minus_logsumexp(logits):
    """vLLM's CPU router without renormalisation: exp(l - logsumexp of all logits) of the top-k logits, the
    softmax of the chosen (to rounding)."""
    top, ids = torch.topk(logits, _K, dim=-1)
    return (top - torch.logsumexp(logits, dim=-1, keepdim=True)).exp(), ids


def _top_then_softmax(logits):
    """The top-k of the float32 logits, a softmax over the k chosen (GraniteMoe): exp(l_i) / the sum over the
    top k, the renormalised softmax, and the same ids (the softmax keeps the order)."""
    top, ids = logits.float().topk(_K, dim=-1)
    return torch.softmax(top, dim=-1), ids


def _top_then_softmax_in_dtype(logits):
    """The same in the logits' dtype (GptOss): eager accumulates a half softmax in float32 and rounds once, as
    the primitive's weights rounded to that dtype."""
    top, ids = torch.topk(logits, _K, dim=-1)
    return torch.nn.functional.softmax(top, dim=-1, dtype=top.dtype), ids


def _top_then_sigmoid_dense(logits):
    """The top-k of the logits scattered into -inf, a sigmoid over all of them (Llama4): the dense [tokens,
    experts] weights, 0 where not chosen.  Its ids are not an output: the experts read the dense weights."""
    top, ids = torch.topk(logits, _K, dim=1)
    dense = torch.full_like(logits, float("-inf")).scatter_(1, ids, top)
    return torch.sigmoid(dense.float()).to(logits.dtype)


def _dense(logits, *, top_k, num_groups, topk_group, weights_dtype):
    """sigmoid(-inf) is 0: the picks' sigmoid scores scattered into zeros, to the bit."""
    weights, ids = torch.ops.kunlun.router(logits, None, top_k, "sigmoid", 1, 1, False, 1.0)
    return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter(-1, ids,
                                                                                         weights).to(weights_dtype)


# ---- stage one: guard and replacement ------------------------------------------------------------------

def _choice(b: Bindings):
    """top_k, num_groups, topk_group read off the matched nodes, or why not."""
    ks = [n.args[1] for n in b.nodes(aten.topk.default)]
    if not all(isinstance(k, int) for k in ks):
        return "a top-k count is not a constant"
    views = [n.meta["val"] for n in b.nodes(aten.view.default) if n.meta["val"].dim() == 3]
    if not views:
        return {"top_k": ks[-1], "num_groups": 1, "topk_group": 1}
    if len(ks) == 3 and ks[0] != 2:  # (group top-2,) groups kept, experts
        return f"a group scores the sum of its top {ks[0]}, the primitive sums the top 2"
    return {"top_k": ks[-1], "num_groups": int(views[0].shape[1]), "topk_group": ks[-2]}


def _guard(b: Bindings, scoring: str, top_first: bool, biased: bool):
    logits = b.val("logits")
    choice = _choice(b)
    if isinstance(choice, str):
        return Refusal(choice)
    experts = logits.shape[-1]
    weights = next(n for n in b.match.output_nodes() if n is not None).meta["val"]
    score_op = aten._softmax.default if scoring == "softmax" else aten.sigmoid.default
    scores = [n.meta["val"] for n in b.nodes(score_op)]
    reason = g.first(
        g.float_dtype(logits, "router logits"),
        None if isinstance(experts, int) else f"the expert count {experts} is symbolic",
        # a top-k over scores rounded to half precision may break ties unlike one over float32 scores
        None if top_first or all(s.dtype == torch.float32 for s in scores) else
        f"the router scores in {scores[0].dtype}, the primitive in float32",
        _bias_of(b.val("bias"), experts) if biased else None)
    if not reason and experts % choice["num_groups"]:
        reason = f"{choice['num_groups']} groups do not divide {experts} experts"
    kept = experts if choice["num_groups"] == 1 else choice["topk_group"] * experts // choice["num_groups"]
    if not reason and not 1 <= choice["top_k"] <= kept:
        reason = f"top_k {choice['top_k']} of {kept} experts that can be chosen"
    if reason:
        return Refusal(reason)
    return {**choice, "weights_dtype": weights.dtype}


def _bias_of(bias, experts) -> Optional[str]:
    """None for a float bias of one value per expert, in any shape ([E], [1, E]: the kernel takes it as [E])."""
    if bias.is_floating_point() and g.known_equal(bias.numel(), experts):
        return None
    return f"the correction bias is {bias.dtype} {tuple(bias.shape)}, not {experts} floats"


def _as_primitive(logits, bias=None, *, scoring, renormalize, top_k, num_groups, topk_group, weights_dtype):
    weights, ids = torch.ops.kunlun.router(logits, bias, top_k, scoring, num_groups, topk_group, renormalize, 1.0)
    return weights.to(weights_dtype), ids


def _logits(dtype, biased: bool = False):
    logits = torch.randn(_M, _E, dtype=dtype)
    return (logits, torch.randn(_E, dtype=dtype)) if biased else (logits,)


_ANY_TOPK = (aten.topk.default,)
_UNSORTED = ((aten.topk.default, 4),)  # `sorted` (canonical.py writes every top-k argument out)
SPELLINGS = {}  # rule name -> the spelling in words, for near misses


def _recognise(name: str, words: str, search, scoring: str, *, biased=False, top_first=False, renormalize=None,
               needs=(), dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> Rewrite:
    """top_first: the top-k is of the logits (a softmax over the k chosen is the renormalised softmax)."""
    SPELLINGS[name] = words
    search.__doc__ = search.__doc__ or words[0].upper() + words[1:]  # what `kunlun-compile passes` lists
    renormalize = top_first if renormalize is None else renormalize
    return Rewrite(family="moe_gate", name=name, search=search,
                   replace=lambda *t, **p: _as_primitive(*t, scoring=scoring, renormalize=renormalize, **p),
                   example_inputs=lambda dtype: _logits(dtype, biased), dtypes=dtypes, float32_in_any_graph=True,
                   guard=lambda b: _guard(b, scoring, top_first, biased), free_arguments=_UNSORTED,
                   needs=_ANY_TOPK + tuple(needs))


def _recognise_rules() -> List[Rewrite]:
    rules = []
    for scoring, score_op in (("softmax", aten._softmax.default), ("sigmoid", aten.sigmoid.default)):
        rules.append(_recognise(f"router_{scoring}_top", f"top-k of {scoring} scores", _top_of_scores(scoring),
                                scoring, needs=(score_op,)))
        rules.append(_recognise(f"router_{scoring}_steered", f"top-k of {scoring} scores + a bias, scores gathered",
                                _steered(scoring), scoring, biased=True, needs=(score_op, aten.gather.default)))
        for biased in (True, False):
            rules.append(_recognise(
                f"router_{scoring}_grouped{'_steered' if biased else ''}",
                f"group-limited top-k of {scoring} scores{' + a bias' if biased else ''}",
                _grouped(scoring, biased, _GROUPS, _TOPK_GROUP), scoring, biased=biased,
                needs=(score_op, aten.gather.default, aten.scatter.value)))
        for (groups, topk_group), which in (((_GROUPS, _TOPK_GROUP), "grouped"), ((1, 1), "one_group")):
            rules.append(_recognise(
                f"router_{scoring}_{which}_values", f"{which.replace('_', ' ')}-limited top-k of {scoring} scores "
                "by group max, its values the weights", _grouped_values(scoring, groups, topk_group), scoring,
                needs=(score_op, aten.max.dim, aten.scatter.value)))
    rules.append(_recognise("router_sigmoid_one_group_steered", "group-limited top-k of sigmoid scores + a bias, "
                            "one group", _grouped("sigmoid", True, 1, 1), "sigmoid", biased=True,
                            needs=(aten.sigmoid.default, aten.gather.default, aten.scatter.value)))
    dense = _recognise("router_top_then_sigmoid_dense", "top-k of the logits scattered into -inf, sigmoid of "
                       "all (dense weights)", _top_then_sigmoid_dense, "sigmoid", top_first=True,
                       needs=(aten.sigmoid.default, aten.scatter.src))
    rules.append(dataclasses.replace(dense, replace=_dense))
    rules.append(_recognise("router_top_then_exp_minus_logsumexp", "top-k of the logits, exp(l - logsumexp)",
                            _top_then_exp_minus_logsumexp, "softmax", top_first=True, renormalize=False,
                            needs=(aten.logsumexp.default, aten.exp.default)))
    rules.append(_recognise("router_top_then_softmax", "top-k of the logits, softmax over the k chosen",
                            _top_then_softmax, "softmax", top_first=True, needs=(aten._softmax.default,)))
    rules.append(_recognise("router_top_then_softmax_in_dtype", "top-k of the logits, softmax over the k "
                            "chosen in their dtype", _top_then_softmax_in_dtype, "softmax", top_first=True,
                            needs=(aten._softmax.default,), dtypes=(torch.bfloat16, torch.float16)))
    return rules


RECOGNISE = _recognise_rules()


# ---- widen: a renormalisation and a scale written after the choice -----------------------------------

_FREE = tuple((ROUTER, i) for i in range(2, 8))  # top_k .. scale match any value; the guards read them
_ROUTER_ARGS = ("top_k", "scoring", "num_groups", "topk_group", "renormalize", "scale")


def _router_params(b: Bindings) -> dict:
    (node,) = b.nodes(ROUTER)
    return dict(zip(_ROUTER_ARGS, node.args[2:8]))


def _primitive(logits, bias=None):
    return torch.ops.kunlun.router(logits, bias, _K, "softmax", 1, 1, False, 1.0)


def _renormalized(logits, bias=None):
    weights, ids = _primitive(logits, bias)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def _scaled(logits, bias=None, scale=None):
    weights, ids = _primitive(logits, bias)
    return weights * scale, ids


def _upcast(logits, bias=None):
    return _primitive(logits.float(), bias)


def _renormalize_guard(b: Bindings):
    p = _router_params(b)
    if p["renormalize"] or p["scale"] != 1.0:
        return Refusal("the weights are renormalised after they were renormalised or scaled")
    return {**p, "renormalize": True}


def _scale_guard(b: Bindings):
    p = _router_params(b)
    reason = g.first(g.constant_float(b.scalar("scale"), "routed_scaling_factor"),
                     None if p["scale"] == 1.0 else "the weights are scaled twice")
    return Refusal(reason) if reason else {**p, "scale": b.scalar("scale")}


def _widened(logits, bias=None, **p):
    return torch.ops.kunlun.router(logits, bias, *(p[k] for k in _ROUTER_ARGS))


def _widen_rule(name: str, search, guard, biased: bool, needs, constants=None) -> Rewrite:
    """`search(logits, bias=None)`: traced with the example inputs given, so a rule without the bias has none."""
    return Rewrite(family="moe_gate", name=name + ("_steered" if biased else ""), search=search,
                   replace=_widened, example_inputs=lambda dtype: _logits(torch.float32, biased), dtypes=(),
                   constants=constants or {}, guard=guard, free_arguments=_FREE, needs=(ROUTER,) + needs)


def _upcast_rule(biased: bool) -> Rewrite:
    """The primitive scores in float32 whatever it is given: a `.float()` of half logits before it (a router
    whose float32 form matched first) is dropped, so the kernel reads the half logits."""
    return Rewrite(family="moe_gate", name="router_upcast_logits" + ("_steered" if biased else ""), search=_upcast,
                   replace=_widened, example_inputs=lambda dtype: _logits(dtype, biased),
                   dtypes=(torch.bfloat16, torch.float16), guard=_router_params, free_arguments=_FREE,
                   needs=(ROUTER, aten._to_copy.default))


WIDEN = [rule for biased in (False, True) for rule in (
    _upcast_rule(biased),
    _widen_rule("router_renormalized", _renormalized, _renormalize_guard, biased, (aten.sum.dim_IntList,)),
    _widen_rule("router_scaled", _scaled, _scale_guard, biased, (aten.mul.Tensor,), {"scale": SCALE}))]


# ---- fuse: the primitive as the kernel; lower: what nothing fused, as its reference ------------------

def _as_moe_gate(logits, bias=None, **p):
    """`kunlun::moe_gate` takes [M, E] logits, an [E] bias and gives int32 ids: the primitive's leading dims
    are flattened and restored, its int64 ids restored (a model's own cast back to int32 then cancels:
    `fold_cast_round_trips`)."""
    experts, lead = logits.shape[-1], logits.shape[:-1]
    flat = logits if logits.dim() == 2 else logits.reshape(-1, experts)
    weights, ids = torch.ops.kunlun.moe_gate(flat, p["top_k"], p["scoring"], p["renormalize"], p["num_groups"],
                                             p["topk_group"], bias if bias is None or bias.dim() == 1 else
                                             bias.reshape(experts), p["scale"])
    if logits.dim() != 2:
        weights, ids = weights.view(*lead, p["top_k"]), ids.view(*lead, p["top_k"])
    return weights, ids.long()


def _lowered(logits, bias=None, **p):
    return reference(logits, bias, *(p[k] for k in _ROUTER_ARGS))


def _at_rule(name: str, replace, biased: bool) -> Rewrite:
    return Rewrite(family="moe_gate", name=name + ("_steered" if biased else ""), search=_primitive, replace=replace,
                   example_inputs=lambda dtype: _logits(torch.float32, biased), dtypes=(),
                   guard=_router_params, free_arguments=_FREE, needs=(ROUTER,))


FUSE = [_at_rule("router", _as_moe_gate, biased) for biased in (False, True)]
LOWER = [_at_rule("router_reference", _lowered, biased) for biased in (False, True)]


def unfused(gm: fx.GraphModule) -> List[str]:
    """A near miss for every primitive the fuse stage did not take (a bisect's limit): its spelling."""
    lines = []
    for node in gm.graph.find_nodes(op="call_function", target=ROUTER):
        if node.meta.get(REFUSED):
            continue
        meta = next((u.meta for u in node.users if MADE_BY in u.meta), node.meta)  # its outputs' items hold it
        spelling = SPELLINGS.get(meta.get(MADE_BY), "a router")
        lines.append(f"moe_gate: {meta.get(REPLACES, node.name)} (router, {spelling}, of {val(node.args[0])} "
                     "logits) left unfused; the router was recognised but not fused (a bisect's limit stops it)")
    return lines
