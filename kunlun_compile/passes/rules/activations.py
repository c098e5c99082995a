"""Activation-and-multiply, stage one: every spelling of `act(gate) * up` -> the `kunlun::act_and_mul` primitive.

SwiGLU is `F.silu(g) * u` in HF's MLPs, `u * F.silu(g)` in others, `g * torch.sigmoid(g) * u` where silu is
written out; GeGLU multiplies `F.gelu`; an attention output gate is `x * torch.sigmoid(g)` or
`torch.sigmoid(g) * x`.  Each becomes one primitive that remembers the activation and how it was written; the
gated-linear rules (`linears.py`) fuse a primitive with the projection it feeds, whichever order the product
was written in, and `LOWER` puts every primitive nothing fused back as the model's own arithmetic, with a near
miss where it fed a linear layer that could not take it (GeGLU: the kernel's activations are silu and
sigmoid).  Commuted products are separate search functions: the matcher compares arguments in order.
"""
from __future__ import annotations

from typing import List

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...ops.act_and_mul import reference
from ..explain_anchors import val
from ..pattern_engine import Bindings, Refusal, Rewrite
from ..rewrites import REFUSED, REPLACES
from . import guards as g

aten = torch.ops.aten
ACT_AND_MUL = torch.ops.kunlun.act_and_mul.default
FREE = ((ACT_AND_MUL, 2),)  # the activation: read by the guards


# ---- the spellings: (name, search, activation, the ATen op the search needs) -----------------------------

def _silu_left(gate, up):
    return F.silu(gate) * up


def _silu_right(gate, up):
    return up * F.silu(gate)


def _written_left(gate, up):
    return gate * torch.sigmoid(gate) * up


def _written_right(gate, up):
    return up * (gate * torch.sigmoid(gate))


def _written_sigmoid_first_left(gate, up):
    return torch.sigmoid(gate) * gate * up


def _written_sigmoid_first_right(gate, up):
    return up * (torch.sigmoid(gate) * gate)


def _gelu_left(gate, up):
    return F.gelu(gate) * up


def _gelu_right(gate, up):
    return up * F.gelu(gate)


def _gelu_tanh_left(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _gelu_tanh_right(gate, up):
    return up * F.gelu(gate, approximate="tanh")


def _sigmoid_left(gate, up):
    return torch.sigmoid(gate) * up


def _sigmoid_right(gate, up):
    return up * torch.sigmoid(gate)


# silu written out before the plain sigmoid gate, whose pattern is a part of it
SPELLINGS = [
    ("silu_times_up", _silu_left, "silu", aten.silu.default),
    ("up_times_silu", _silu_right, "silu", aten.silu.default),
    ("written_silu_times_up", _written_left, "silu_written", aten.sigmoid.default),
    ("up_times_written_silu", _written_right, "silu_written", aten.sigmoid.default),
    ("written_silu_sigmoid_first_times_up", _written_sigmoid_first_left, "silu_written", aten.sigmoid.default),
    ("up_times_written_silu_sigmoid_first", _written_sigmoid_first_right, "silu_written", aten.sigmoid.default),
    # tanh first: the plain gelu pattern would also match it (its guard refuses)
    ("gelu_tanh_times_up", _gelu_tanh_left, "gelu_tanh", aten.gelu.default),
    ("up_times_gelu_tanh", _gelu_tanh_right, "gelu_tanh", aten.gelu.default),
    ("gelu_times_up", _gelu_left, "gelu", aten.gelu.default),
    ("up_times_gelu", _gelu_right, "gelu", aten.gelu.default),
    ("sigmoid_times_up", _sigmoid_left, "sigmoid", aten.sigmoid.default),
    ("up_times_sigmoid", _sigmoid_right, "sigmoid", aten.sigmoid.default),
]


def _recognise_guard(b: Bindings, activation: str):
    gate, up = b.val("gate"), b.val("up")
    # the matcher compares the arguments a pattern spells, not keywords it leaves out: `F.gelu(g)`'s pattern
    # also matches `F.gelu(g, approximate="tanh")`
    approximate = {n.kwargs.get("approximate", "none") for n in b.nodes(aten.gelu.default)}
    reason = g.first(
        g.float_dtype(gate, "gate"), g.float_dtype(up, "up"),
        None if approximate <= {"tanh" if activation == "gelu_tanh" else "none"}
        else f"gelu with approximate={sorted(approximate)} is not {activation}")
    return Refusal(reason) if reason else {}


def _inputs(dtype):
    return torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype)


RECOGNISE = [
    Rewrite(family="decode_linear", name=f"act_and_mul_{name}", search=search,
            replace=lambda gate, up, activation=activation: torch.ops.kunlun.act_and_mul(gate, up, activation),
            example_inputs=_inputs, guard=lambda b, activation=activation: _recognise_guard(b, activation),
            needs=(needed, aten.mul.Tensor))
    for name, search, activation, needed in SPELLINGS]


# ---- what nothing fused goes back as the model wrote it ------------------------------------------------

def _primitive(gate, up):
    return torch.ops.kunlun.act_and_mul(gate, up, "silu")


def _lower_guard(b: Bindings):
    (node,) = b.nodes(ACT_AND_MUL)
    return {"activation": node.args[2]}


LOWER = [Rewrite(family="decode_linear", name="act_and_mul_reference", search=_primitive,
                 replace=lambda gate, up, activation: reference(gate, up, activation), example_inputs=_inputs,
                 guard=_lower_guard, free_arguments=FREE, needs=(ACT_AND_MUL,))]

_LINEAR_USES = (aten.mm.default, aten.addmm.default, torch.ops.kunlun.linear.default)
_PASSING = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _feeds_a_linear(node: fx.Node) -> bool:
    for user in node.users:
        if user.target in _LINEAR_USES and user.args[0] is node:
            return True
        if user.target in _PASSING and _feeds_a_linear(user):
            return True
    return False


def unfused(gm: fx.GraphModule) -> List[str]:
    """A near miss for every primitive that feeds a linear layer and was not fused into it (one a gated rule
    refused already has its reason listed)."""
    lines = []
    for node in gm.graph.find_nodes(op="call_function", target=ACT_AND_MUL):
        if node.meta.get(REFUSED) or not _feeds_a_linear(node):
            continue
        gate, up, activation = node.args
        why = ("kunlun::gated_linear's activations are silu and sigmoid" if activation.startswith("gelu")
               else "no gated-linear rule matched around it")
        lines.append(f"decode_linear: {node.meta.get(REPLACES, node.name)} ({activation}(gate) * up, gate "
                     f"{val(gate)}, up {val(up)}) feeds a linear layer and was left unfused; {why}")
    return lines
