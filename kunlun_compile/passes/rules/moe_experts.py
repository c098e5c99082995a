"""moe_ffn: every spelling of the routed experts -> the `kunlun::experts` primitive -> kunlun::fused_moe.

Stage one (`RECOGNISE`) has one rule per way model code dispatches tokens to experts, each replacing it with
the primitive (`ops/experts.py`: its meaning, with the weights as logical [E, 2I, H] / [E, H, I] views):
- gather form (vLLM-style reference experts; the built-in models): each token's
  k experts' weights are gathered and applied with einsum;
- HF transformers `batched_mm` experts (tokens repeated k times, per-pair bmm
  against gathered weights, weighted sum over k);
- HF transformers `grouped_mm` experts, its default: (token, k) pairs sorted by
  expert, `histc(...).cumsum` offsets, two grouped GEMMs (`torch._grouped_mm`,
  or transformers' fallback op in fp32), weights applied in sorted order, pairs
  put back by the inverse permutation and summed over k; also with the expert-parallel sentinel masks
  (`masked_fill` of rows whose id >= E around each GEMM), recognised only where the ids are a top-k over the
  E router scores, so no sentinel can occur; and gpt-oss's form of it: weights stored [E, K, N], a bias
  gathered per sorted row after each GEMM, the clamped SwiGLU over interleaved gate/up columns ("swigluoai"),
  under `grouped_mm` and under `batched_mm`;
- gpt-oss as its own reference implementation spells it: the gather form with biases and that activation;
- sorted dispatch as hand-written decode stacks spell it: `argsort` of the flat ids, counts by `histc` or
  `one_hot(...).sum(0)`, `cumsum` offsets, `torch._grouped_mm` against weights stored [E, K, N], then weights
  applied in sorted order and `index_add_` back onto the tokens, or rows put back by `index_copy` and
  weighted and summed over k there.
- Llama4's dense experts behind a top-1 router (every token through every expert, inputs scaled by the
  scores): made the primitive at small static token counts (`DENSE_FUSED_UP_TO_TOKENS`; see there why).
`FUSE` makes every primitive `kunlun::fused_moe` (the kernel reads [E, K, N] weights through their strides);
`LOWER` puts back what nothing fused (a bisect's limit) in the gather form, with a near miss.
HF's `eager` experts implementation loops over `nonzero()` results, and `torch.bincount` counts have a
data-dependent size: Dynamo breaks the graph at both, so those forms never reach a pass whole
(`explain_anchors.routed_without_router` says so).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...ops import fused_moe as fused_moe_op
from ...ops import grouped_mm as grouped_mm_op
from ..explain_anchors import val
from ..pattern_engine import Bindings, Refusal, Rewrite
from ..rewrites import MADE_BY, REFUSED, REPLACES
from . import guards as g

aten = torch.ops.aten
EXPERTS = torch.ops.kunlun.experts.default
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


def _hf_sorted(hidden_states, top_k_index, top_k_weights, experts: int):
    """transformers' grouped_mm experts up to the GEMMs: (token, k) pairs sorted by expert, their rows, weights
    and the per-expert offsets."""
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // top_k_index.size(-1)]
    sample_weights_g = sample_weights[perm]
    # HF casts to float32 on the CPU, to int32 on CUDA: the rule leaves the cast's dtype free
    tokens_per_expert = torch.histc(expert_ids_g.float(), bins=experts, min=0, max=experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    return selected, expert_ids_g, perm, sample_weights_g, offsets


def _hf_unsorted_sum(proj, sample_weights_g, perm, hidden_states, num_top_k: int):
    """...and after them: weighted in sorted order, put back by the inverse permutation, summed over k."""
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted = weighted[inv_perm]
    return weighted.view(hidden_states.size(0), num_top_k, hidden_states.size(-1)).sum(dim=1).to(hidden_states.dtype)


def _hf_grouped_mm(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, sentinels: bool):
    experts = gate_up_proj.shape[0]
    selected, expert_ids_g, perm, sample_weights_g, offsets = _hf_sorted(hidden_states, top_k_index, top_k_weights,
                                                                         experts)
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
    return _hf_unsorted_sum(proj, sample_weights_g, perm, hidden_states, top_k_index.size(-1))


def hf_grouped_mm_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    return _hf_grouped_mm(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, sentinels=False)


def hf_grouped_mm_sentinel_experts(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    """The same with transformers' expert-parallel sentinel masks: always on in transformers 5.17, behind
    `_is_expert_parallel` in 5.24."""
    return _hf_grouped_mm(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights, sentinels=True)


# gpt-oss (transformers `use_experts_implementation(is_transposed=True, has_bias=True)` with its own gate):
# markers for the constants the rule takes from the graph, the clamp's lower bound a marker of its own (the
# guard checks it is -limit)
OAI_MARKERS = {"alpha": 1.61803, "limit": 6.2831, "neg_limit": -5.4321}


def _oai_gate(proj, alpha, limit, neg_limit):
    """transformers' GptOssExperts._apply_gate."""
    gate, up = proj[..., ::2], proj[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=neg_limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def hf_batched_mm_oai_experts(hidden_states, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                              top_k_index, top_k_weights, alpha, limit, neg_limit):
    """The same experts under transformers' `batched_mm` implementation (weights stored [E, K, N])."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    selected = hidden_states.repeat_interleave(num_top_k, dim=0)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    proj = torch.bmm(selected.unsqueeze(1), gate_up_proj[expert_ids]).squeeze(1) + gate_up_proj_bias[expert_ids]
    proj = _oai_gate(proj, alpha, limit, neg_limit)
    proj = torch.bmm(proj.unsqueeze(1), down_proj[expert_ids]).squeeze(1) + down_proj_bias[expert_ids]
    weighted = proj * sample_weights.unsqueeze(-1)
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def hf_grouped_mm_oai_experts(hidden_states, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias,
                              top_k_index, top_k_weights, alpha, limit, neg_limit):
    selected, expert_ids_g, perm, sample_weights_g, offsets = _hf_sorted(hidden_states, top_k_index, top_k_weights,
                                                                         gate_up_proj.shape[0])
    proj = torch.ops.kunlun.grouped_mm(selected, gate_up_proj, offsets) + gate_up_proj_bias[expert_ids_g]
    proj = _oai_gate(proj, alpha, limit, neg_limit)
    proj = torch.ops.kunlun.grouped_mm(proj, down_proj, offsets) + down_proj_bias[expert_ids_g]
    return _hf_unsorted_sum(proj, sample_weights_g, perm, hidden_states, top_k_index.size(-1))


def gather_einsum_oai_experts(x, w13, b13, w2, b2, topk_weights, topk_ids, alpha, limit, neg_limit):
    """gpt-oss as its own reference implementation spells its MLP block: each token's k experts' weights and
    biases gathered, einsum GEMVs, the clamped SwiGLU over interleaved columns written as `glu * (linear + 1)`,
    the k results weighted and summed by one more einsum.  w13 [E, 2I, H], w2 [E, H, I]."""
    t = torch.einsum("beck,bk->bec", w13[topk_ids], x) + b13[topk_ids]
    x_glu, x_linear = t[..., ::2], t[..., 1::2]
    x_glu = x_glu.clamp(min=None, max=limit)
    x_linear = x_linear.clamp(min=neg_limit, max=limit)
    t = x_glu * torch.sigmoid(alpha * x_glu) * (x_linear + 1)
    t = torch.einsum("beck,bek->bec", w2[topk_ids], t) + b2[topk_ids]
    return torch.einsum("bec,be->bc", t, topk_weights)


def _sorted_dispatch(count: str, back: str = "index_add"):
    """Sorted dispatch as a hand-written decode stack spells it, its counts by `count` (histc / one_hot):
    weights stored [E, K, N], the layout `torch._grouped_mm` multiplies by.  `back`: how the rows return to
    their tokens -- weighted in sorted order and `index_add_`-ed onto the tokens, or put back in (token, k)
    order by `index_copy` and weighted and summed over k there ("unsort")."""
    def search(x, w_up, w_down, ids, weights):
        k, experts = ids.shape[-1], w_up.shape[0]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        if count == "histc":
            counts = torch.histc(flat.float(), bins=experts, min=0, max=experts - 1)
        else:
            counts = F.one_hot(flat, experts).sum(0)
        offs = counts.cumsum(0).to(torch.int32)
        rows = order // k
        gate, up = torch.ops.kunlun.grouped_mm(x[rows], w_up, offs).chunk(2, dim=-1)
        y = torch.ops.kunlun.grouped_mm(F.silu(gate) * up, w_down, offs)
        if back == "index_add":
            y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
            return torch.zeros_like(x).index_add_(0, rows, y)
        pairs = y.new_empty(y.shape).index_copy_(0, order, y).view(-1, k, y.shape[-1])
        return (pairs * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    search.__doc__ = (f"Sorted dispatch: argsort of the ids, {count} counts, torch._grouped_mm against [E, K, N] "
                      f"weights, {'index_add_ back' if back == 'index_add' else 'index_copy back, weighted sum'}")
    return search


def dense_top1_experts(x, w_up, w_down, ids, weights):
    """Every token through every expert, its input weighted by the router's dense scores (Llama4's experts
    after its router, fused into `kunlun::moe_gate` and scattered back into zeros by the router rules):
    weights stored [E, K, N], `up * silu(gate)`, the per-expert outputs summed."""
    experts, hidden = w_up.shape[0], x.shape[-1]
    dense = torch.zeros((x.shape[0], experts), dtype=torch.float32).scatter(-1, ids, weights).to(x.dtype)
    routed_in = x.repeat(experts, 1) * dense.transpose(0, 1).reshape(-1, 1)
    gate, up = torch.bmm(routed_in.view(experts, -1, hidden), w_up).chunk(2, dim=-1)
    out = torch.bmm(up * F.silu(gate), w_down).view(-1, hidden)
    return out.reshape(experts, -1, hidden).sum(dim=0)


_EXACT_FOR_EXPERT_IDS = (torch.float32, torch.float64, torch.int32, torch.int64)


def _counts_guard(b: Bindings, experts, k, dtype: torch.dtype):
    """What the wildcards of a sorted form leave free must be what the fused op assumes: counts over exactly
    the experts, pairs mapped back to tokens by top-k, casts that count ids exactly, offsets in an integer
    type, and the result in the hidden states' dtype."""
    for histc in b.nodes(aten.histc.default):
        params = dict(zip(("bins", "min", "max"), histc.args[1:]), **histc.kwargs)
        bins, low, high = params.get("bins", 100), params.get("min", 0), params.get("max", 0)
        if not (g.known_equal(bins, experts) and low == 0 and g.known_equal(high, experts - 1)):
            return Refusal(f"expert offsets count {bins} bins over [{low}, {high}], not the {experts} experts")
    counted = {h.args[0] for h in b.nodes(aten.histc.default)}
    for cast in b.nodes(aten._to_copy.default):
        to = cast.kwargs.get("dtype")
        if cast in counted or cast.args[0].meta["val"].dtype is torch.bool:  # ids before histc, a one-hot
            if to not in _EXACT_FOR_EXPERT_IDS:
                return Refusal(f"expert ids are cast to {to} before counting them")
        elif any("grouped_mm" in str(u.target) for u in cast.users):
            if to not in (torch.int32, torch.int64):
                return Refusal(f"expert offsets are cast to {to}, not to an integer type")
        elif to != dtype:
            return Refusal(f"the experts' sum is cast to {to}, not to the hidden states' dtype")
    (divide,) = b.nodes(aten.floor_divide.default)
    if not g.known_equal(divide.args[1], k):
        return Refusal(f"sorted pairs map to tokens by // {divide.args[1]}, not by top-k {k}")
    return {}


def _grouped_guard(b: Bindings):
    """HF's grouped form: the shared checks, the sorted form's, and the sentinels' (where it has them)."""
    verdict = _guard(b, "hidden_states", "gate_up_proj", "down_proj", "top_k_weights", "top_k_index")
    if isinstance(verdict, Refusal):
        return verdict
    experts, k = b.val("gate_up_proj").shape[0], b.val("top_k_index").shape[1]
    verdict = _counts_guard(b, experts, k, b.val("hidden_states").dtype)
    if isinstance(verdict, Refusal):
        return verdict
    for compare in b.nodes(aten.ge.Scalar):  # the sentinel form: masks must provably select nothing
        if not g.known_equal(compare.args[1], experts):
            return Refusal(f"sentinel mask tests ids >= {compare.args[1]}, not >= the {experts} experts")
        reason = g.topk_indices_over(b.node("top_k_index"), experts)
        if reason:
            return Refusal(f"expert ids may hold sentinels (>= {experts}): {reason}")
    return {}


def _oai_check(b: Bindings, x, w13, w2, b13, b2, weights, ids):
    """The shared checks on the weights as the primitive's [E, 2I, H] / [E, H, I] views, then biases one row
    per expert and a clamp symmetric about zero on the up half (None: all hold)."""
    verdict = _check(x, w13, w2, weights, ids)
    if isinstance(verdict, Refusal):
        return verdict
    e, two_i, h = w13.shape
    if tuple(b13.shape) != (e, two_i) or tuple(b2.shape) != (e, h) or not (b13.dtype == b2.dtype == x.dtype):
        return Refusal(f"expert biases {tuple(b13.shape)} {b13.dtype}, {tuple(b2.shape)} {b2.dtype} are "
                       f"not one {x.dtype} row per expert")
    limit, low = b.scalar("limit"), b.scalar("neg_limit")
    if low != -limit:
        return Refusal(f"the up half is clamped to [{low}, {limit}], not symmetric about zero")
    return None


def _oai_guard(b: Bindings, sorted_form: bool = True):
    """transformers' gpt-oss forms: [E, K, N] weights, then (grouped_mm) the sorted form's checks."""
    x, w_up, w_down = b.val("hidden_states"), b.val("gate_up_proj"), b.val("down_proj")
    if w_up.dim() != 3 or w_down.dim() != 3:
        return Refusal(f"expert weights {tuple(w_up.shape)}, {tuple(w_down.shape)} are not [E, K, N]")
    verdict = _oai_check(b, x, w_up.transpose(1, 2), w_down.transpose(1, 2), b.val("gate_up_proj_bias"),
                         b.val("down_proj_bias"), b.val("top_k_weights"), b.val("top_k_index"))
    if verdict or not sorted_form:
        return verdict or {}
    return _counts_guard(b, w_up.shape[0], b.val("top_k_index").shape[1], x.dtype)


def _oai_gather_guard(b: Bindings):
    """gpt-oss's reference form: the weights are the primitive's already."""
    return _oai_check(b, *(b.val(n) for n in ("x", "w13", "w2", "b13", "b2", "topk_weights", "topk_ids"))) or {}


def _sorted_guard(b: Bindings):
    """The [E, K, N] weights seen as the primitive's [E, N, K] (a transpose, no copy), then the shared checks."""
    x, w_up, w_down = b.val("x"), b.val("w_up"), b.val("w_down")
    if w_up.dim() != 3 or w_down.dim() != 3:
        return Refusal(f"expert weights {tuple(w_up.shape)}, {tuple(w_down.shape)} are not [E, K, N]")
    verdict = _check(x, w_up.transpose(1, 2), w_down.transpose(1, 2), b.val("weights"), b.val("ids"))
    if isinstance(verdict, Refusal):
        return verdict
    return _counts_guard(b, w_up.shape[0], b.val("ids").shape[1], x.dtype)


# Llama4's dense experts fused are a read of the chosen experts' weights against the bmm's read of all of
# them.  On the H200 (benchmarks/NOTES.md v34, v36), E = 32, H = 2048, I = 768: at 1 and 4 tokens fused_moe
# took half the bmm's time; at 16 and 128 tokens the layer ran slower fused (1.22x / 1.38x inductor against
# 0.95x / 0.92x), since fused_moe's top-1 paths read the [E, K, N] weights with pointer loads along N where
# the bmm's stream them.  So they fuse at a static token count up to this one, and stay dense above it.
DENSE_FUSED_UP_TO_TOKENS = 4
_FUSE_DENSE: "contextvars.ContextVar[Optional[bool]]" = contextvars.ContextVar("kunlun_fuse_dense_experts",
                                                                              default=None)


@contextlib.contextmanager
def fusing_dense_experts(on: Optional[bool] = True) -> Iterator[None]:
    """Within this block (compiles run at a model's first call) dense top-1 experts become the primitive at
    every token count (True), at none (False), or up to DENSE_FUSED_UP_TO_TOKENS static tokens (None)."""
    token = _FUSE_DENSE.set(on)
    try:
        yield
    finally:
        _FUSE_DENSE.reset(token)


def _dense_size_refusal(tokens) -> Optional[Refusal]:
    """Why the dense experts stay dense at this token count, or None to fuse."""
    mode = _FUSE_DENSE.get()
    if mode is not None:
        return None if mode else Refusal("dense top-1 experts left as the dense bmm's: "
                                         "`moe_experts.fusing_dense_experts(False)` is in force")
    where = "benchmarks/NOTES.md v34, v36; `moe_experts.fusing_dense_experts()` fuses them at every size"
    if not isinstance(tokens, int):
        return Refusal(f"dense top-1 experts (Llama4's form) over a symbolic token count ({tokens}) left as the "
                       f"dense bmm's: fused_moe is faster only up to {DENSE_FUSED_UP_TO_TOKENS} tokens ({where})")
    if tokens > DENSE_FUSED_UP_TO_TOKENS:
        return Refusal(f"dense top-1 experts (Llama4's form) over {tokens} tokens left as the dense bmm's: "
                       f"fused_moe read their [E, K, N] weights slower than the bmm's above "
                       f"{DENSE_FUSED_UP_TO_TOKENS} tokens on the H200 ({where})")
    return None


def _dense_guard(b: Bindings):
    """Top-1 only: a token's one expert then sees `x * s`, which the fused op is given as its input (with
    weight 1), and the other experts see zeros and add exact zeros.  With k > 1 each expert sees its own
    scaling of x, which the kernel (weights on outputs) cannot take."""
    x, w_up, w_down, ids = b.val("x"), b.val("w_up"), b.val("w_down"), b.val("ids")
    if ids.dim() != 2 or not g.known_equal(ids.shape[1], 1):
        return Refusal(f"dense experts weighted on their input with {tuple(ids.shape)} ids: fused only for a "
                       "top-1 router (the kernel weights each expert's output)")
    if w_up.dim() != 3 or w_down.dim() != 3:
        return Refusal(f"expert weights {tuple(w_up.shape)}, {tuple(w_down.shape)} are not [E, K, N]")
    (repeat,) = b.nodes(aten.repeat.default)
    if not (len(repeat.args[1]) == 2 and g.known_equal(repeat.args[1][0], w_up.shape[0])
            and repeat.args[1][1] == 1):
        return Refusal(f"the tokens are repeated {list(repeat.args[1])} times, not once per expert")
    verdict = _check(x, w_up.transpose(1, 2), w_down.transpose(1, 2), b.val("weights"), ids)
    if verdict == {}:
        return _dense_size_refusal(x.shape[0]) or verdict
    return verdict


def _guard(b: Bindings, x: str, w13: str, w2: str, weights: str, ids: str):
    return _check(*(b.val(n) for n in (x, w13, w2, weights, ids)))


def _check(xv, w13v, w2v, wv, iv):
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


def _as_primitive(x, w13, w2, topk_weights, topk_ids):
    return torch.ops.kunlun.experts(x, w13, w2, topk_weights, topk_ids, "silu")


def _hf_as_primitive(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights):
    return torch.ops.kunlun.experts(hidden_states, gate_up_proj, down_proj, top_k_weights, top_k_index, "silu")


def _sorted_as_primitive(x, w_up, w_down, ids, weights):
    return torch.ops.kunlun.experts(x, w_up.transpose(1, 2), w_down.transpose(1, 2), weights, ids, "silu")


def _dense_as_primitive(x, w_up, w_down, ids, weights):
    """The one expert's input is `x * s` in x's dtype, as the model rounds it; its output is taken with weight 1."""
    scaled = x * weights.to(x.dtype)
    return torch.ops.kunlun.experts(scaled, w_up.transpose(1, 2), w_down.transpose(1, 2), torch.ones_like(weights),
                                    ids, "silu")


def _oai_as_primitive(hidden_states, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, top_k_index,
                      top_k_weights, alpha, limit, neg_limit):
    return torch.ops.kunlun.experts(hidden_states, gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2),
                                    top_k_weights, top_k_index, "swigluoai", gate_up_proj_bias, down_proj_bias,
                                    alpha, limit)


def _oai_gather_as_primitive(x, w13, b13, w2, b2, topk_weights, topk_ids, alpha, limit, neg_limit):
    return torch.ops.kunlun.experts(x, w13, w2, topk_weights, topk_ids, "swigluoai", b13, b2, alpha, limit)


def _oai_gather_inputs(dtype):
    x = torch.randn(_T, _H, dtype=dtype)
    w13, w2 = torch.randn(_E, 2 * _I, _H, dtype=dtype), torch.randn(_E, _H, _I, dtype=dtype)
    b13, b2 = torch.randn(_E, 2 * _I, dtype=dtype), torch.randn(_E, _H, dtype=dtype)
    return x, w13, b13, w2, b2, torch.rand(_T, _K, dtype=dtype), torch.randint(0, _E, (_T, _K))


def _oai_inputs(dtype):
    x = torch.randn(_T, _H, dtype=dtype)
    w_up, w_down = torch.randn(_E, _H, 2 * _I, dtype=dtype), torch.randn(_E, _I, _H, dtype=dtype)
    b_up, b_down = torch.randn(_E, 2 * _I, dtype=dtype), torch.randn(_E, _H, dtype=dtype)
    return x, w_up, b_up, w_down, b_down, torch.randint(0, _E, (_T, _K)), torch.rand(_T, _K, dtype=dtype)


def _dense_inputs(dtype, tokens=_T):
    x = torch.randn(tokens, _H, dtype=dtype)
    w_up, w_down = torch.randn(_E, _H, 2 * _I, dtype=dtype), torch.randn(_E, _I, _H, dtype=dtype)
    return x, w_up, w_down, torch.randint(0, _E, (tokens, 1)), torch.rand(tokens, 1)


def _inputs(dtype, hf: bool, float_weights: bool = False):
    x = torch.randn(_T, _H, dtype=dtype)
    w13, w2 = torch.randn(_E, 2 * _I, _H, dtype=dtype), torch.randn(_E, _H, _I, dtype=dtype)
    ids = torch.randint(0, _E, (_T, _K), dtype=torch.int64 if hf else torch.int32)
    weights = torch.rand(_T, _K, dtype=dtype if hf and not float_weights else torch.float32)
    return (x, w13, w2, ids, weights) if hf else (x, w13, w2, weights, ids)


def _sorted_inputs(dtype, float_weights: bool):
    x = torch.randn(_T, _H, dtype=dtype)
    w_up, w_down = torch.randn(_E, _H, 2 * _I, dtype=dtype), torch.randn(_E, _I, _H, dtype=dtype)
    ids = torch.randint(0, _E, (_T, _K))
    return x, w_up, w_down, ids, torch.rand(_T, _K, dtype=torch.float32 if float_weights else dtype)


_GROUPED_ALIASES = {torch.ops.kunlun.grouped_mm.default: grouped_mm_op.ALIASES}
_GROUPED = dict(replace=_hf_as_primitive, guard=_grouped_guard, needs=(aten.sort.default, aten.histc.default),
                aliases=_GROUPED_ALIASES, free_arguments=((aten._to_copy.default, "dtype"), (aten.ge.Scalar, 1)))
_HALF = (torch.bfloat16, torch.float16)


def _sorted_rules() -> List[Rewrite]:
    rules = []
    for count, counter in (("histc", aten.histc.default), ("one_hot", aten.sum.dim_IntList)):
        for back, scatter in (("index_add", aten.index_add.default), ("unsort", aten.index_copy.default)):
            for float_weights in (False, True):
                rules.append(Rewrite(
                    family="moe_ffn", search=_sorted_dispatch(count, back), replace=_sorted_as_primitive,
                    name=f"sorted_{count}_grouped_mm" + ("" if back == "index_add" else "_unsort")
                    + ("_float_weights" if float_weights else ""),
                    example_inputs=lambda dtype, fw=float_weights: _sorted_inputs(dtype, fw),
                    dtypes=_HALF if float_weights else (torch.float32,) + _HALF, guard=_sorted_guard,
                    aliases=_GROUPED_ALIASES, free_arguments=((aten._to_copy.default, "dtype"),),
                    needs=(aten.sort.stable, scatter, counter)))
    return rules


RECOGNISE = [
    Rewrite(family="moe_ffn", name="gather_einsum", search=gather_experts, replace=_as_primitive,
            example_inputs=lambda dtype: _inputs(dtype, hf=False),
            guard=lambda b: _guard(b, "x", "w13", "w2", "topk_weights", "topk_ids"),
            needs=(aten.bmm.default, aten.index.Tensor)),
    Rewrite(family="moe_ffn", name="hf_batched_mm", search=hf_batched_mm_experts, replace=_hf_as_primitive,
            example_inputs=lambda dtype: _inputs(dtype, hf=True),
            guard=lambda b: _guard(b, "hidden_states", "gate_up_proj", "down_proj", "top_k_weights", "top_k_index"),
            needs=(aten.bmm.default, aten.index.Tensor)),
    Rewrite(family="moe_ffn", name="hf_grouped_mm", search=hf_grouped_mm_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True), **_GROUPED),
    # Mixtral's router leaves its weights in float32: the weighted sum promotes and casts back once
    Rewrite(family="moe_ffn", name="hf_grouped_mm_float_weights", search=hf_grouped_mm_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True, float_weights=True), dtypes=_HALF, **_GROUPED),
    Rewrite(family="moe_ffn", name="hf_grouped_mm_sentinels", search=hf_grouped_mm_sentinel_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True), **_GROUPED),
    Rewrite(family="moe_ffn", name="hf_grouped_mm_sentinels_float_weights", search=hf_grouped_mm_sentinel_experts,
            example_inputs=lambda dtype: _inputs(dtype, hf=True, float_weights=True), dtypes=_HALF, **_GROUPED),
    Rewrite(family="moe_ffn", name="hf_grouped_mm_swigluoai", search=hf_grouped_mm_oai_experts,
            replace=_oai_as_primitive, example_inputs=_oai_inputs, constants=OAI_MARKERS, guard=_oai_guard,
            aliases=_GROUPED_ALIASES, free_arguments=((aten._to_copy.default, "dtype"),),
            needs=(aten.sort.default, aten.histc.default, aten.clamp.default, aten.sigmoid.default)),
    Rewrite(family="moe_ffn", name="hf_batched_mm_swigluoai", search=hf_batched_mm_oai_experts,
            replace=_oai_as_primitive, example_inputs=_oai_inputs, constants=OAI_MARKERS,
            guard=lambda b: _oai_guard(b, sorted_form=False),
            needs=(aten.bmm.default, aten.index.Tensor, aten.clamp.default)),
    Rewrite(family="moe_ffn", name="gather_einsum_swigluoai", search=gather_einsum_oai_experts,
            replace=_oai_gather_as_primitive, example_inputs=_oai_gather_inputs, constants=OAI_MARKERS,
            guard=_oai_gather_guard, needs=(aten.bmm.default, aten.clamp.default, aten.sigmoid.default)),
    *_sorted_rules(),
    *(Rewrite(family="moe_ffn", name=name, search=dense_top1_experts, replace=_dense_as_primitive,
              example_inputs=lambda dtype, t=tokens: _dense_inputs(dtype, t), guard=_dense_guard,
              free_arguments=((aten._to_copy.default, "dtype"),),
              needs=(aten.bmm.default, aten.scatter.src, aten.repeat.default))
      # one token (a decode step traced with static sizes): the transposed scores are then already laid out
      # as the reshape wants, so the graph has no copy there and the views around the GEMMs are no-ops
      for name, tokens in (("dense_top1_bmm", _T), ("dense_top1_bmm_one_token", 1))),
]


# ---- fuse: the primitive as the kernel; lower: what nothing fused, in a form a CUDA graph can hold ----------

def _primitive(x, w13, w2, topk_weights, topk_ids):
    return torch.ops.kunlun.experts(x, w13, w2, topk_weights, topk_ids, "silu")


def _fused(x, w13, w2, topk_weights, topk_ids):
    return torch.ops.kunlun.fused_moe(x, w13, w2, topk_weights.float(), topk_ids, "silu")


def _biased_primitive(x, w13, w2, topk_weights, topk_ids, b13, b2, alpha, limit):
    return torch.ops.kunlun.experts(x, w13, w2, topk_weights, topk_ids, "swigluoai", b13, b2, alpha, limit)


def _biased_fused(x, w13, w2, topk_weights, topk_ids, b13, b2, alpha, limit):
    return torch.ops.kunlun.fused_moe(x, w13, w2, topk_weights.float(), topk_ids, "swigluoai", b13, b2, alpha, limit)


def gather_experts_biased(x, w13, w2, topk_weights, topk_ids, b13, b2, alpha, limit):
    """The gather form of the biased, clamped-SwiGLU experts (gpt-oss): what nothing fused goes back to."""
    ids = topk_ids.long()
    h = torch.einsum("th,tkih->tki", x, w13[ids]) + b13[ids]
    act = fused_moe_op.act_and_mul(h, "swigluoai", alpha, limit)
    out = torch.einsum("tki,tkhi->tkh", act, w2[ids]) + b2[ids]
    return (out * topk_weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


def _biased_inputs(dtype):
    x, w13, w2, weights, ids = _inputs(dtype, hf=False)
    return x, w13, w2, weights, ids, torch.randn(_E, 2 * _I, dtype=dtype), torch.randn(_E, _H, dtype=dtype)


def _at_rule(name: str, replace) -> Rewrite:
    return Rewrite(family="moe_ffn", name=name, search=_primitive, replace=replace,
                   example_inputs=lambda dtype: _inputs(torch.float32, hf=False), dtypes=(),
                   guard=lambda b: _guard(b, "x", "w13", "w2", "topk_weights", "topk_ids"), needs=(EXPERTS,))


def _at_biased_rule(name: str, replace) -> Rewrite:
    return Rewrite(family="moe_ffn", name=name, search=_biased_primitive, replace=replace,
                   example_inputs=lambda dtype: _biased_inputs(torch.float32), dtypes=(),
                   constants={"alpha": OAI_MARKERS["alpha"], "limit": OAI_MARKERS["limit"]},
                   guard=lambda b: _guard(b, "x", "w13", "w2", "topk_weights", "topk_ids"), needs=(EXPERTS,))


FUSE = [_at_rule("experts", _fused), _at_biased_rule("experts_swigluoai", _biased_fused)]
LOWER = [_at_rule("experts_reference", gather_experts),
         _at_biased_rule("experts_swigluoai_reference", gather_experts_biased)]


def unfused(gm: fx.GraphModule) -> List[str]:
    """A near miss for every primitive the fuse stage did not take (a bisect's limit): its spelling."""
    lines = []
    for node in gm.graph.find_nodes(op="call_function", target=EXPERTS):
        if node.meta.get(REFUSED):
            continue
        spelling = node.meta.get(MADE_BY, "an expert dispatch")
        lines.append(f"moe_ffn: {node.meta.get(REPLACES, node.name)} (experts, {spelling}, over "
                     f"{val(node.args[1])} weights) left unfused; the experts were recognised but not fused "
                     "(a bisect's limit stops it)")
    return lines
