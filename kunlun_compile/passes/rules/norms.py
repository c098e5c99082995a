"""add_rmsnorm: residual add + RMSNorm -> kunlun::fused_add_rmsnorm, a lone RMSNorm -> kunlun::rms_norm.

The search functions are the norms as model code writes them:
- vLLM `RMSNorm.forward_native` (sum formed in fp32; cast, then `* weight`),
- Gemma / Qwen3-Next (sum in the dtype; `* (1 + weight)` in fp32, one cast),
- HF transformers Llama/Qwen3 (`weight * x.to(dtype)`; the residual is added
  outside the norm, in the dtype: the op normalises that rounded sum
  (`sum_in_dtype`), where vLLM's form normalises the unrounded fp32 sum),
- HF Olmo2 and kin (`(weight * x).to(dtype)`) and torch's own `F.rms_norm` / `nn.RMSNorm` (its
  decomposition: `(x.float() * rsqrt(..) * weight).to(dtype)`): the weight multiplies in fp32 and the
  product is rounded once (the op's `weight_in_float`).
Rules with a residual come first, so a lone-norm rule never splits one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g

EPS = 1.2345e-6  # marker: the traced constant that becomes the graph's eps


def _norm_inputs(dtype, residual: bool):
    x = torch.randn(5, 24, dtype=dtype)
    w = torch.randn(24, dtype=dtype)
    return (x, torch.randn(5, 24, dtype=dtype), w) if residual else (x, w)


# ---- search functions (the model's code) ---------------------------------------------------------

def vllm_residual(x, residual, weight, eps):
    orig_dtype = x.dtype
    x = x.to(torch.float32) + residual.to(torch.float32)
    residual = x.to(orig_dtype)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return x.to(orig_dtype) * weight, residual


def vllm_residual_unused(x, residual, weight, eps):
    """The last norm of a model: its new residual is dropped, so the graph has no cast for it."""
    return vllm_residual(x, residual, weight, eps)[0]


def vllm_lone(x, weight, eps):
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return x.to(orig_dtype) * weight


def gemma_residual(x, residual, weight, eps):
    orig_dtype = x.dtype
    x = x + residual
    residual = x
    x = x.float()
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return (x * (1.0 + weight.float())).to(orig_dtype), residual


def hf_residual(x, residual, weight, eps):
    """HF decoder layer: `hidden = residual + hidden; residual = hidden; hidden = norm(hidden)`."""
    x = x + residual
    return hf_lone(x, weight, eps), x


def hf_residual_unused(x, residual, weight, eps):
    """HF's final norm after the last layer's residual add."""
    return hf_residual(x, residual, weight, eps)[0]


def gemma_lone(x, weight, eps):
    orig_dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return (x * (1.0 + weight.float())).to(orig_dtype)


def hf_lone(x, weight, eps):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(input_dtype)


def hf_weight_first_lone(x, weight, eps):
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return (weight * x).to(input_dtype)


def hf_float_weight_lone(x, weight, eps):
    """Helium: the weight cast to float32 and multiplied there, the product rounded once (in fp32 graphs
    the cast is a no-op and `hf_weight_first_lone` matches)."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return (weight.to(torch.float32) * x).to(input_dtype)


def hf_weightless_lone(x, eps):
    """Llama4's L2 Q/K norm: an RMSNorm without a weight, in float32, cast back with `type_as`."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def torch_lone(x, weight, eps):
    """torch's own RMSNorm, `F.rms_norm` (and `nn.RMSNorm`), traced through its decomposition."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def torch_residual(x, residual, weight, eps):
    x = x + residual
    return torch_lone(x, weight, eps), x


def torch_residual_unused(x, residual, weight, eps):
    return torch_residual(x, residual, weight, eps)[0]


# ---- replacements -------------------------------------------------------------------------------------

def fused_residual(x, residual, weight, *, eps, norm_offset, sum_in_dtype=False, weight_in_float=False):
    out, new_residual = torch.ops.kunlun.fused_add_rmsnorm(x, residual, weight, eps, norm_offset, sum_in_dtype,
                                                           weight_in_float)
    return out, new_residual


def fused_residual_unused(x, residual, weight, *, eps, norm_offset, sum_in_dtype=False, weight_in_float=False):
    return torch.ops.kunlun.fused_add_rmsnorm(x, residual, weight, eps, norm_offset, sum_in_dtype,
                                              weight_in_float)[0]


def fused_lone(x, weight, *, eps, norm_offset, weight_in_float=False):
    return torch.ops.kunlun.rms_norm(x, weight, eps, norm_offset, weight_in_float)


def fused_weightless(x, *, eps, norm_offset):
    """A weight of ones: the op rounds the normalised x once, then multiplies by 1 -- the model's rounding."""
    return torch.ops.kunlun.rms_norm(x, x.new_ones(x.shape[-1]), eps, 0.0)


def _weightless_guard(b: Bindings):
    reason = g.first(g.positive_eps(b.scalar("eps")), g.float_dtype(b.val("x"), "x"))
    return Refusal(reason) if reason else {"norm_offset": 0.0}


# ---- guards -------------------------------------------------------------------------------------------

def _guard(b: Bindings, gemma: bool, residual: bool, sum_in_dtype: bool = False, weight_in_float: bool = False):
    x, w = b.val("x"), b.val("weight")
    reason = g.first(
        g.positive_eps(b.scalar("eps")),
        g.float_dtype(x, "x"),
        g.vector_of(w, x.shape[-1], "weight"),
        # x.to(dtype) * w would promote; a product formed in fp32 takes any float weight
        None if gemma or weight_in_float else g.same_dtype(x, w, "x and weight"),
        g.float_dtype(w, "weight"),
    )
    if not reason and residual:
        r = b.val("residual")
        reason = g.same_dtype(x, r, "x and residual") or (
            None if g.same_shape(x, r) else f"residual {tuple(r.shape)} broadcasts against x {tuple(x.shape)}")
    if reason:
        return Refusal(reason)
    params = {"norm_offset": 1.0 if gemma else 0.0}
    if sum_in_dtype:
        params["sum_in_dtype"] = True
    if weight_in_float:
        params["weight_in_float"] = True
    return params


_HALF = (torch.bfloat16, torch.float16)


def _rule(name, search, replace, gemma, residual, sum_in_dtype=False, weight_in_float=False,
          dtypes=(torch.float32,) + _HALF):
    return Rewrite(
        family="add_rmsnorm", name=name, search=search, replace=replace,
        example_inputs=lambda dtype: _norm_inputs(dtype, residual), constants={"eps": EPS},
        guard=lambda b: _guard(b, gemma, residual, sum_in_dtype, weight_in_float), dtypes=dtypes)


# Gemma rules first: in fp32 `x * (1 + w)` is also a vLLM norm whose weight is the computed `1 + w`
RESIDUAL_RULES = [
    _rule("gemma_residual", gemma_residual, fused_residual, gemma=True, residual=True),
    _rule("vllm_residual", vllm_residual, fused_residual, gemma=False, residual=True),
    _rule("vllm_residual_unused", vllm_residual_unused, fused_residual_unused, gemma=False, residual=True),
    _rule("hf_residual", hf_residual, fused_residual, gemma=False, residual=True, sum_in_dtype=True),
    _rule("hf_residual_unused", hf_residual_unused, fused_residual_unused, gemma=False, residual=True,
          sum_in_dtype=True),
    # in fp32 torch's norm is the vLLM form above
    _rule("torch_residual", torch_residual, fused_residual, gemma=False, residual=True, sum_in_dtype=True,
          weight_in_float=True, dtypes=_HALF),
    _rule("torch_residual_unused", torch_residual_unused, fused_residual_unused, gemma=False, residual=True,
          sum_in_dtype=True, weight_in_float=True, dtypes=_HALF),
]
LONE_RULES = [
    _rule("gemma_lone", gemma_lone, fused_lone, gemma=True, residual=False),
    _rule("vllm_lone", vllm_lone, fused_lone, gemma=False, residual=False),
    _rule("hf_lone", hf_lone, fused_lone, gemma=False, residual=False),
    _rule("hf_weight_first_lone", hf_weight_first_lone, fused_lone, gemma=False, residual=False,
          weight_in_float=True),
    _rule("hf_float_weight_lone", hf_float_weight_lone, fused_lone, gemma=False, residual=False,
          weight_in_float=True, dtypes=_HALF),
    _rule("torch_lone", torch_lone, fused_lone, gemma=False, residual=False, weight_in_float=True, dtypes=_HALF),
    # last: a weighted norm's core is this pattern too, and is fused with its weight by the rules above
    Rewrite(family="add_rmsnorm", name="hf_weightless_lone", search=hf_weightless_lone, replace=fused_weightless,
            example_inputs=lambda dtype: (torch.randn(5, 24, dtype=dtype),), constants={"eps": EPS},
            guard=_weightless_guard),
]
RULES = RESIDUAL_RULES + LONE_RULES
