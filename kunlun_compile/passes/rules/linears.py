"""decode_linear: a linear layer's `x @ w.T (+ b)` -> kunlun::linear.

The op runs a GEMV at decode row counts and cuBLAS otherwise (`ops.linear.plan_linear`), so the
rewrite only refuses where the sizes are static and the plan is cuBLAS anyway.  It goes after every
other family: their patterns may start at a projection's output, and a router's logits must
still be a plain mm when the moe_gate rules look at them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops.linear import plan_linear
from ..pattern_engine import Bindings, Refusal, Rewrite
from . import guards as g

aten = torch.ops.aten


def linear_search(x, weight):
    return F.linear(x, weight)


def linear_bias_search(x, weight, bias):
    return F.linear(x, weight, bias)


def linear_replace(x, weight, bias=None):
    return torch.ops.kunlun.linear(x, weight, bias)


def _guard(b: Bindings):
    x, w = b.val("x"), b.val("weight")
    reason = g.first(
        g.float_dtype(x, "x"),
        g.same_dtype(x, w, "x and weight"),
        None if x.dim() == 2 and w.dim() == 2 else f"x {tuple(x.shape)} / weight {tuple(w.shape)} are not 2-D",
    )
    if not reason and not any(isinstance(s, torch.SymInt) for s in (*x.shape, *w.shape)):
        if plan_linear(int(x.shape[0]), int(w.shape[0]), int(w.shape[1])).path == "cublas":
            reason = f"static {x.shape[0]} rows x {w.shape[0]} columns: cuBLAS is the kernel at this size"
    return Refusal(reason) if reason else {}


def _inputs(dtype, bias: bool):
    x, w = torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
    return (x, w, torch.randn(5, dtype=dtype)) if bias else (x, w)


RULES = [
    Rewrite(family="decode_linear", name="linear_bias", search=linear_bias_search, replace=linear_replace,
            example_inputs=lambda dtype: _inputs(dtype, True), guard=_guard, needs=(aten.addmm.default,)),
    Rewrite(family="decode_linear", name="linear", search=linear_search, replace=linear_replace,
            example_inputs=lambda dtype: _inputs(dtype, False), guard=_guard, needs=(aten.mm.default,)),
]
