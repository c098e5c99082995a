"""RMSNorm, two stages: every spelling -> the `kunlun::rmsnorm_primitive` primitive (`RECOGNISE`, run first in
the attention prologue's family, so that its rules take Q/K norms as primitives, and again here); then residual
add + primitive -> kunlun::fused_add_rmsnorm and a lone primitive -> kunlun::rms_norm (`FUSE`); what is left
goes back as its reference (`LOWER`).

The search functions are the norms as model code writes them, each recognised with its rounding:
- vLLM `RMSNorm.forward_native` (sum formed in fp32; cast, then `* weight`),
- Gemma / Qwen3-Next (sum in the dtype; `* (1 + weight)` in fp32, one cast),
- HF transformers Llama/Qwen3 (`weight * x.to(dtype)`; the residual is added
  outside the norm, in the dtype: the op normalises that rounded sum
  (`sum_in_dtype`, `add_then_norm`), where vLLM's form normalises the unrounded fp32 sum),
- HF Olmo2 and kin (`(weight * x).to(dtype)`) and torch's own `F.rms_norm` / `nn.RMSNorm` (its
  decomposition: `(x.float() * rsqrt(..) * weight).to(dtype)`): the weight multiplies in fp32 and the
  product is rounded once (the op's `weight_in_float`).
A primitive records eps, the `1 + w` offset and whether the weight multiplies in fp32 (`weight_in_float`); the
fusing rules read them off the node, so one rule serves every spelling.  vLLM's residual form stays a whole
rule: it normalises the unrounded fp32 sum, which no lone spelling covers in half precision.
"""
from __future__ import annotations

from typing import List

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...ops.rmsnorm_primitive import reference
from ..explain_anchors import val
from ..pattern_engine import Bindings, Refusal, Rewrite
from ..rewrites import REFUSED, REPLACES
from . import guards as g

EPS = 1.2345e-6  # marker: the traced constant that becomes the graph's eps
aten = torch.ops.aten
RMSNORM = torch.ops.kunlun.rmsnorm_primitive.default
FREE = ((RMSNORM, 2), (RMSNORM, 3), (RMSNORM, 4))  # eps, norm_offset, weight_in_float: read by the guards


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


# ---- stage one: each spelling -> the primitive ------------------------------------------------------------

def _as_primitive(x, weight, *, eps, norm_offset, weight_in_float=False):
    return torch.ops.kunlun.rmsnorm_primitive(x, weight, eps, norm_offset, weight_in_float)


def _as_weightless_primitive(x, *, eps):
    return torch.ops.kunlun.rmsnorm_primitive(x, None, eps, 0.0, False)


def _recognise_guard(b: Bindings, gemma: bool, weight_in_float: bool):
    x, w = b.val("x"), b.val("weight")
    reason = g.first(
        g.positive_eps(b.scalar("eps")),
        g.float_dtype(x, "x"),
        g.vector_of(w, x.shape[-1], "weight"),
        # x.to(dtype) * w would promote; a product formed in fp32 takes any float weight
        None if gemma or weight_in_float else g.same_dtype(x, w, "x and weight"),
        g.float_dtype(w, "weight"))
    if reason:
        return Refusal(reason)
    return {"norm_offset": 1.0 if gemma else 0.0, "weight_in_float": gemma or weight_in_float}


def _weightless_guard(b: Bindings):
    reason = g.first(g.positive_eps(b.scalar("eps")), g.float_dtype(b.val("x"), "x"))
    return Refusal(reason) if reason else {}


_HALF = (torch.bfloat16, torch.float16)


def _recognise(name, search, gemma=False, weight_in_float=False, dtypes=(torch.float32,) + _HALF):
    return Rewrite(family="add_rmsnorm", name=f"rmsnorm_{name}", search=search, replace=_as_primitive,
                   example_inputs=lambda dtype: _norm_inputs(dtype, False), constants={"eps": EPS},
                   guard=lambda b: _recognise_guard(b, gemma, weight_in_float), dtypes=dtypes,
                   needs=(aten.rsqrt.default,))


# Gemma first: in fp32 `x * (1 + w)` is also a vLLM norm whose weight is the computed `1 + w`
RECOGNISE = [
    _recognise("gemma", gemma_lone, gemma=True),
    _recognise("vllm", vllm_lone),
    _recognise("hf", hf_lone),
    _recognise("hf_weight_first", hf_weight_first_lone, weight_in_float=True),
    _recognise("hf_float_weight", hf_float_weight_lone, weight_in_float=True, dtypes=_HALF),
    # in fp32 torch's decomposition is the vLLM form above
    _recognise("torch", torch_lone, weight_in_float=True, dtypes=_HALF),
    # last: a weighted norm's core is this pattern too, and is taken with its weight by the rules above
    Rewrite(family="add_rmsnorm", name="rmsnorm_weightless", search=hf_weightless_lone,
            replace=_as_weightless_primitive, example_inputs=lambda dtype: (torch.randn(5, 24, dtype=dtype),),
            constants={"eps": EPS}, guard=_weightless_guard, needs=(aten.rsqrt.default,)),
]


# ---- stage two: primitives (and vLLM's residual form) -> the kernels ----------------------------------------

def _primitive(x, weight):
    return torch.ops.kunlun.rmsnorm_primitive(x, weight, EPS, 0.0, False)


def add_then_norm(x, residual, weight):
    """A residual add in the dtype, its sum normalised and passed on: HF, Gemma, torch's norms behind `x + r`."""
    total = x + residual
    return _primitive(total, weight), total


def add_then_norm_unused(x, residual, weight):
    """The last norm of a model: the sum is only normalised."""
    return _primitive(x + residual, weight)


def _params(b: Bindings):
    """(eps, norm_offset, weight_in_float) of the one primitive in the match."""
    (node,) = b.nodes(RMSNORM)
    return {"eps": node.args[2], "norm_offset": node.args[3], "weight_in_float": node.args[4]}


def fused_from_primitive(x, residual, weight, *, eps, norm_offset, weight_in_float):
    return torch.ops.kunlun.fused_add_rmsnorm(x, residual, weight, eps, norm_offset, True, weight_in_float)


def fused_from_primitive_unused(x, residual, weight, *, eps, norm_offset, weight_in_float):
    return torch.ops.kunlun.fused_add_rmsnorm(x, residual, weight, eps, norm_offset, True, weight_in_float)[0]


def _add_guard(b: Bindings):
    x, r = b.val("x"), b.val("residual")
    reason = g.same_dtype(x, r, "x and residual") or (
        None if g.same_shape(x, r) else f"residual {tuple(r.shape)} broadcasts against x {tuple(x.shape)}")
    return Refusal(reason) if reason else _params(b)


def fused_residual(x, residual, weight, *, eps):
    return torch.ops.kunlun.fused_add_rmsnorm(x, residual, weight, eps, 0.0, False, False)


def fused_residual_unused(x, residual, weight, *, eps):
    return torch.ops.kunlun.fused_add_rmsnorm(x, residual, weight, eps, 0.0, False, False)[0]


def _vllm_guard(b: Bindings):
    x, w, r = b.val("x"), b.val("weight"), b.val("residual")
    reason = g.first(
        g.positive_eps(b.scalar("eps")), g.float_dtype(x, "x"), g.vector_of(w, x.shape[-1], "weight"),
        g.same_dtype(x, w, "x and weight"), g.same_dtype(x, r, "x and residual"),
        None if g.same_shape(x, r) else f"residual {tuple(r.shape)} broadcasts against x {tuple(x.shape)}")
    return Refusal(reason) if reason else {}


def fused_lone(x, weight, *, eps, norm_offset, weight_in_float):
    return torch.ops.kunlun.rms_norm(x, weight, eps, norm_offset, weight_in_float)


def _weightless_primitive(x):
    return torch.ops.kunlun.rmsnorm_primitive(x, None, EPS, 0.0, False)


def fused_weightless(x, *, eps, norm_offset, weight_in_float):
    """A weight of ones: the op rounds the normalised x once, then multiplies by 1 -- the model's rounding."""
    return torch.ops.kunlun.rms_norm(x, x.new_ones(x.shape[-1]), eps, 0.0)


def _fuse(name, search, replace, guard, residual: bool, **kw):
    return Rewrite(family="add_rmsnorm", name=name, search=search, replace=replace,
                   example_inputs=lambda dtype: _norm_inputs(dtype, residual), guard=guard,
                   free_arguments=FREE, needs=(RMSNORM,), **kw)


FUSE = [
    # in half precision vLLM's norm is not a lone spelling (its input is the fp32 sum); in fp32 the norm part
    # is a primitive by now and `add_then_norm` takes it
    Rewrite(family="add_rmsnorm", name="vllm_residual", search=vllm_residual, replace=fused_residual,
            example_inputs=lambda dtype: _norm_inputs(dtype, True), constants={"eps": EPS}, guard=_vllm_guard,
            dtypes=_HALF, needs=(aten.rsqrt.default,)),
    Rewrite(family="add_rmsnorm", name="vllm_residual_unused", search=vllm_residual_unused,
            replace=fused_residual_unused, example_inputs=lambda dtype: _norm_inputs(dtype, True),
            constants={"eps": EPS}, guard=_vllm_guard, dtypes=_HALF, needs=(aten.rsqrt.default,)),
    _fuse("add_rmsnorm", add_then_norm, fused_from_primitive, _add_guard, residual=True),
    _fuse("add_rmsnorm_unused", add_then_norm_unused, fused_from_primitive_unused, _add_guard, residual=True),
    # a weightless primitive before the weighted rule, which would bind its None weight (and say so)
    Rewrite(family="add_rmsnorm", name="rmsnorm_weightless_kernel", search=_weightless_primitive,
            replace=fused_weightless, example_inputs=lambda dtype: (torch.randn(5, 24, dtype=dtype),),
            guard=_params, free_arguments=FREE, needs=(RMSNORM,)),
    _fuse("rmsnorm", _primitive, fused_lone, _params, residual=False),
]


# ---- what nothing fused goes back as its reference ------------------------------------------------------

LOWER = [
    Rewrite(family="add_rmsnorm", name="rmsnorm_weightless_reference", search=_weightless_primitive,
            replace=lambda x, **p: reference(x, None, **p),
            example_inputs=lambda dtype: (torch.randn(5, 24, dtype=dtype),), guard=_params, dtypes=(),
            free_arguments=FREE, needs=(RMSNORM,)),
    Rewrite(family="add_rmsnorm", name="rmsnorm_reference", search=_primitive,
            replace=lambda x, weight, **p: reference(x, weight, **p),
            example_inputs=lambda dtype: _norm_inputs(dtype, False), guard=_params, dtypes=(),
            free_arguments=FREE, needs=(RMSNORM,)),
]


def unfused(gm: fx.GraphModule) -> List[str]:
    """A near miss for every primitive no rule fused (a refusing rule's reason is listed already)."""
    return [f"add_rmsnorm: {n.meta.get(REPLACES, n.name)} (RMSNorm of {val(n.args[0])}) left unfused; no norm "
            "rule matched around it" for n in gm.graph.find_nodes(op="call_function", target=RMSNORM)
            if not n.meta.get(REFUSED)]
