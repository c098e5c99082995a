"""Checks shared by the rewrite rules' guards.  Each returns a reason string, or None when fine."""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def constant_float(value, what: str) -> Optional[str]:
    if isinstance(value, fx.Node):
        return f"{what} is a tensor, not a Python constant"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{what} is {type(value).__name__} {value!r}, not a number"
    return None


def positive_eps(value) -> Optional[str]:
    bad = constant_float(value, "eps")
    if bad:
        return bad
    if not value > 0:
        return f"eps must be > 0, got {value}"
    return None


def float_dtype(t: torch.Tensor, what: str) -> Optional[str]:
    if t.dtype not in FLOAT_DTYPES:
        return f"{what} dtype {t.dtype} is not one of fp32/bf16/fp16"
    return None


def same_dtype(a: torch.Tensor, b: torch.Tensor, what: str) -> Optional[str]:
    if a.dtype != b.dtype:
        return f"{what}: dtypes differ ({a.dtype} vs {b.dtype}); the fused op keeps one dtype"
    return None


def known_equal(x, y) -> bool:
    return statically_known_true(x == y)


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(known_equal(x, y) for x, y in zip(a.shape, b.shape))


def vector_of(w: torch.Tensor, n, what: str) -> Optional[str]:
    if w.dim() != 1 or not known_equal(w.shape[0], n):
        return f"{what} has shape {tuple(w.shape)}, expected [{n}]"
    return None


def first(*reasons: Optional[str]) -> Optional[str]:
    return next((r for r in reasons if r), None)


_ID_PASSTHROUGH = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._to_copy.default,
                   torch.ops.aten.clone.default}


def topk_indices_over(ids: fx.Node, n) -> Optional[str]:
    """None when `ids` are the indices of a top-k over a dimension of size `n` (so every id is < n): an
    `aten.topk`, or a router already fused into `kunlun::moe_gate` (its ids index the logits' last dim)."""
    while ids.op == "call_function" and ids.target in _ID_PASSTHROUGH:
        if ids.target is torch.ops.aten._to_copy.default and ids.kwargs.get("dtype") not in (torch.int32,
                                                                                            torch.int64, None):
            return f"they are cast to {ids.kwargs.get('dtype')}"
        ids = ids.args[0]
    source = ids.args[0] if ids.op == "call_function" and ids.target is operator.getitem and ids.args[1] == 1 else None
    if isinstance(source, fx.Node) and source.target is torch.ops.aten.topk.default:
        dim = source.args[2] if len(source.args) > 2 else source.kwargs.get("dim", -1)
    elif isinstance(source, fx.Node) and source.target is torch.ops.kunlun.moe_gate.default:
        dim = -1
    else:
        return f"they come from {ids.target if ids.op == 'call_function' else ids.op}, not from a top-k"
    scores = source.args[0].meta["val"]
    if not known_equal(scores.shape[dim], n):
        return f"the top-k picks among {scores.shape[dim]} scores, not {n}"
    return None
