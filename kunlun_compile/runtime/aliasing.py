"""Which nodes of an ATen graph share memory with their inputs, and which write to them."""
from __future__ import annotations

import operator
from typing import List

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that return a tensor sharing its input's memory without saying so in their schema.
_UNDECLARED_VIEWS = {aten._unsafe_view.default, aten.reshape.default, aten._reshape_alias.default,
                     aten.contiguous.default, aten.flatten.using_ints}


def is_view(node: fx.Node) -> bool:
    """True when `node` may return memory of its first tensor argument (a view, or may-be-a-view)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # an element of split/unbind/chunk's list
        return is_view(node.args[0]) if isinstance(node.args[0], fx.Node) else False
    if node.target in _UNDECLARED_VIEWS:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write


def writes_inputs(node: fx.Node) -> List[fx.Node]:
    """The argument nodes `node` writes to in place (schema `Tensor(a!)` arguments)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written += [v for v in values if isinstance(v, fx.Node)]
    return written


def view_base(node: fx.Node) -> fx.Node:
    """The node whose memory `node` shares, following view chains back."""
    while is_view(node):
        src = node.args[0]  # for a getitem: the split/unbind node, itself a view of its input
        if not isinstance(src, fx.Node):
            break
        node = src
    return node
