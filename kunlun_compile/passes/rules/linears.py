"""decode_linear: a linear layer's `x @ w.T (+ b)` -> kunlun::linear, and a linear whose input is a
gated product (SwiGLU, an attention output gate), with or without a gated residual after it
(Qwen3-Next's shared expert) -> kunlun::gated_linear.

Both ops run a GEMV at decode row counts and cuBLAS otherwise (`ops.linear.plan_linear`), so the
rewrites only refuse where the sizes are static and the plan is cuBLAS anyway.  Within the family
the gated forms go first (the plain rule would take their linear), the larger before the smaller
(a refused residual leaves the gated product to the next rule).  The family goes after every other
one: their patterns may start at a projection's output, and a router's logits must still be a
plain mm when the moe_gate rules look at them.
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


def silu_gated_search(x, gate, weight):  # SwiGLU before a down projection
    return F.linear(F.silu(gate) * x, weight)


def sigmoid_gated_search(x, gate, weight):  # an attention output gate before o_proj
    return F.linear(x * torch.sigmoid(gate), weight)


def shared_expert_search(x, gate, weight, row_gate, addend):  # Qwen3-Next: experts + sigmoid(g) * shared
    return addend + torch.sigmoid(row_gate) * F.linear(F.silu(gate) * x, weight)


def shared_expert_plain_search(x, gate, weight, addend):  # DeepSeek: experts + shared, no gate on it
    return addend + F.linear(F.silu(gate) * x, weight)


def silu_gated_replace(x, gate, weight, row_gate=None, addend=None):
    return torch.ops.kunlun.gated_linear(x, gate, weight, "silu", row_gate, addend)


def silu_gated_add_replace(x, gate, weight, addend):
    return torch.ops.kunlun.gated_linear(x, gate, weight, "silu", None, addend)


def sigmoid_gated_replace(x, gate, weight):
    return torch.ops.kunlun.gated_linear(x, gate, weight, "sigmoid")


def _guard(b: Bindings):
    x, w = b.val("x"), b.val("weight")
    reason = g.first(
        g.float_dtype(x, "x"),
        g.same_dtype(x, w, "x and weight"),
        None if x.dim() == 2 and w.dim() == 2 else f"x {tuple(x.shape)} / weight {tuple(w.shape)} are not 2-D",
    )
    if not reason and "gate" in b.tensor_names:
        gate = b.val("gate")
        reason = g.first(
            g.same_dtype(x, gate, "x and gate"),
            None if gate.shape == x.shape else f"gate {tuple(gate.shape)} is not x's shape {tuple(x.shape)} "
                                               "(a broadcast gate)",
        )
    m, n = (x.shape[0], w.shape[0]) if not reason else (0, 0)
    if not reason and "row_gate" in b.tensor_names:
        rg = b.val("row_gate")
        reason = g.first(
            g.same_dtype(x, rg, "x and the row gate"),
            None if tuple(rg.shape) == (m, 1) else f"row gate {tuple(rg.shape)} is not one value per row",
        )
    if not reason and "addend" in b.tensor_names:
        r = b.val("addend")
        reason = g.first(
            g.same_dtype(x, r, "x and the addend"),
            None if tuple(r.shape) == (m, n) else f"addend {tuple(r.shape)} is not the output's shape (a broadcast)",
        )
    if not reason and not any(isinstance(s, torch.SymInt) for s in (*x.shape, *w.shape)):
        if plan_linear(int(x.shape[0]), int(w.shape[0]), int(w.shape[1])).path == "cublas":
            reason = f"static {x.shape[0]} rows x {w.shape[0]} columns: cuBLAS is the kernel at this size"
    return Refusal(reason) if reason else {}


def _inputs(dtype, bias: bool):
    x, w = torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
    return (x, w, torch.randn(5, dtype=dtype)) if bias else (x, w)


def _gated_inputs(dtype, row_gate: bool = False, addend: bool = False):
    x, gate, w = torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
    return (x, gate, w) + ((torch.randn(3, 1, dtype=dtype),) if row_gate else ()) + \
        ((torch.randn(3, 5, dtype=dtype),) if addend else ())


RULES = [
    Rewrite(family="decode_linear", name="shared_expert", search=shared_expert_search, replace=silu_gated_replace,
            example_inputs=lambda dtype: _gated_inputs(dtype, True, True), guard=_guard,
            needs=(aten.mm.default, aten.silu.default, aten.sigmoid.default)),
    Rewrite(family="decode_linear", name="shared_expert_plain", search=shared_expert_plain_search,
            replace=silu_gated_add_replace, example_inputs=lambda dtype: _gated_inputs(dtype, addend=True),
            guard=_guard, needs=(aten.mm.default, aten.silu.default)),
    Rewrite(family="decode_linear", name="silu_gated", search=silu_gated_search, replace=silu_gated_replace,
            example_inputs=lambda dtype: _gated_inputs(dtype), guard=_guard,
            needs=(aten.mm.default, aten.silu.default)),
    Rewrite(family="decode_linear", name="sigmoid_gated", search=sigmoid_gated_search,
            replace=sigmoid_gated_replace, example_inputs=lambda dtype: _gated_inputs(dtype), guard=_guard,
            needs=(aten.mm.default, aten.sigmoid.default)),
    Rewrite(family="decode_linear", name="linear_bias", search=linear_bias_search, replace=linear_replace,
            example_inputs=lambda dtype: _inputs(dtype, True), guard=_guard, needs=(aten.addmm.default,)),
    Rewrite(family="decode_linear", name="linear", search=linear_search, replace=linear_replace,
            example_inputs=lambda dtype: _inputs(dtype, False), guard=_guard, needs=(aten.mm.default,)),
]
