"""decode_linear: a linear layer's `x @ w.T (+ b)` -> kunlun::linear, and a linear whose input is a
gated product (SwiGLU, an attention output gate: a `kunlun::act_and_mul` primitive by then, whatever its
spelling), with or without a gated residual after it (Qwen3-Next's shared expert) -> kunlun::gated_linear.

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
from . import activations
from . import guards as g
from .activations import ACT_AND_MUL

aten = torch.ops.aten


def linear_search(x, weight):
    return F.linear(x, weight)


def linear_bias_search(x, weight, bias):
    return F.linear(x, weight, bias)


def linear_replace(x, weight, bias=None):
    return torch.ops.kunlun.linear(x, weight, bias)


def _gated(gate, x):  # any activation: the guard reads it (`_activation`)
    return torch.ops.kunlun.act_and_mul(gate, x, "silu")


def gated_search(x, gate, weight):
    """A gated product before a projection: SwiGLU before the down projection, an attention output gate before
    o_proj -- in any spelling, once it is a `kunlun::act_and_mul` primitive (`activations.py`)."""
    return F.linear(_gated(gate, x), weight)


def shared_expert_search(x, gate, weight, row_gate, addend):  # Qwen3-Next: experts + sigmoid(g) * shared
    return addend + torch.ops.kunlun.act_and_mul(row_gate, F.linear(_gated(gate, x), weight), "sigmoid")


def shared_expert_plain_search(x, gate, weight, addend):  # DeepSeek: experts + shared, no gate on it
    return addend + F.linear(_gated(gate, x), weight)


def gated_replace(x, gate, weight, row_gate=None, addend=None, *, activation):
    if row_gate is None and addend is None:
        return torch.ops.kunlun.gated_linear(x, gate, weight, activation)
    return torch.ops.kunlun.gated_linear(x, gate, weight, activation, row_gate, addend)


def gated_add_replace(x, gate, weight, addend, *, activation):
    return torch.ops.kunlun.gated_linear(x, gate, weight, activation, None, addend)


# the primitive's activation -> the kernel's: silu written out is silu (one rounding fewer)
_KERNEL_ACTIVATIONS = {"silu": "silu", "silu_written": "silu", "sigmoid": "sigmoid"}


def _activation(b: Bindings, row_gated: bool):
    """(the kernel's activation, or why not) of the product the projection reads; a shared expert's row gate,
    the later primitive in graph order, must be a sigmoid."""
    products = b.nodes(ACT_AND_MUL)
    written = products[0].args[2]
    if row_gated and products[-1].args[2] != "sigmoid":
        return None, f"the shared expert's row gate is {products[-1].args[2]}, not sigmoid"
    if written not in _KERNEL_ACTIVATIONS:
        return None, f"{written}(gate) * x: kunlun::gated_linear's activations are silu and sigmoid"
    return _KERNEL_ACTIVATIONS[written], None


def _gated_guard(b: Bindings):
    activation, reason = _activation(b, "row_gate" in b.tensor_names)
    if reason:
        return Refusal(reason)
    verdict = _guard(b)
    return verdict if isinstance(verdict, Refusal) else {**verdict, "activation": activation}


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


def _gated_rule(name, search, replace, **inputs) -> Rewrite:
    return Rewrite(family="decode_linear", name=name, search=search, replace=replace,
                   example_inputs=lambda dtype: _gated_inputs(dtype, **inputs), guard=_gated_guard,
                   free_arguments=activations.FREE, needs=(aten.mm.default, ACT_AND_MUL))


RULES = [
    _gated_rule("shared_expert", shared_expert_search, gated_replace, row_gate=True, addend=True),
    _gated_rule("shared_expert_plain", shared_expert_plain_search, gated_add_replace, addend=True),
    _gated_rule("gated", gated_search, gated_replace),
    Rewrite(family="decode_linear", name="linear_bias", search=linear_bias_search, replace=linear_replace,
            example_inputs=lambda dtype: _inputs(dtype, True), guard=_guard, needs=(aten.addmm.default,)),
    Rewrite(family="decode_linear", name="linear", search=linear_search, replace=linear_replace,
            example_inputs=lambda dtype: _inputs(dtype, False), guard=_guard, needs=(aten.mm.default,)),
]
