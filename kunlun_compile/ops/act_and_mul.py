"""kunlun::act_and_mul — the primitive "an activation of `gate` times `up`" that model code spells in many ways:
SwiGLU `F.silu(g) * u` or `u * F.silu(g)`, silu written out (`g * torch.sigmoid(g) * u`), GeGLU with `F.gelu`,
an attention output gate `x * torch.sigmoid(g)`, a shared expert's `sigmoid(row_gate) * y`.  The activation
rules (`passes/rules/activations.py`) turn each spelling into this one node; the gated-linear rules fuse it
with the projection it feeds; whatever is left is put back as its reference, so a graph never keeps it.

    out = act(gate) * up          (broadcast; the dtype is the promotion of both, as eager's)

`activation` names the function *and* how the model wrote it, so the reference is the model's arithmetic
to the bit: "silu" (`F.silu`), "silu_written" (`g * sigmoid(g)`, rounded after each op), "sigmoid",
"gelu" and "gelu_tanh".  A kernel that fuses "silu_written" computes `F.silu` instead: equal in meaning,
one rounding fewer, held to the dtype's tolerance like every other fused kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "silu_written": lambda g: g * torch.sigmoid(g),
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
}


def check_args(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"act_and_mul: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not (gate.is_floating_point() and up.is_floating_point()):
        raise ValueError(f"act_and_mul: gate and up must be float, got {gate.dtype} and {up.dtype}")


def reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](gate) * up


@torch.library.custom_op("kunlun::act_and_mul", mutates_args=())
def act_and_mul(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    check_args(gate, up, activation)
    return reference(gate, up, activation).contiguous()


@act_and_mul.register_fake
def _(gate, up, activation):
    check_args(gate, up, activation)
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))
