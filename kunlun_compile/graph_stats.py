"""Count what a graph will launch: fused kernels, generated kernels, ATen calls.

A node that only changes metadata (views, getitem, size arithmetic) launches
nothing and is not counted.  The classification is by the node's target so
that the report, the CLI and the tests all count the same way.
"""
from __future__ import annotations

import operator
from typing import Dict, List

import torch
import torch.fx as fx

from .report import KERNEL_KINDS

FUSED_NAMESPACE = "kunlun"  # torch.ops.kunlun.* are the fused-op library
POINTWISE_OP_NAME = "pointwise"  # kunlun::pointwise runs a kernel the element-wise lowering generated

_NON_KERNEL_ATEN = {
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_scalar.default,
}


def launches_kernel(node: fx.Node) -> bool:
    if node.op == "call_module":
        return True
    if node.op != "call_function":
        return False
    t = node.target
    host_modules = ("_operator", "math", "torch.fx.experimental.sym_node")
    if t is operator.getitem or getattr(t, "__module__", None) in host_modules:
        return False
    if isinstance(t, torch._ops.OpOverload):
        if t in _NON_KERNEL_ATEN or t.is_view:
            return False
        return True
    if isinstance(t, torch._ops.HigherOrderOperator):
        return True
    return not isinstance(t, type)


def kernel_kind(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and t.namespace == FUSED_NAMESPACE:
        return "pointwise" if t._opname == POINTWISE_OP_NAME else "fused"
    return "aten"


def generated_kernels(gm: fx.GraphModule) -> List[str]:
    """Keys of the generated element-wise kernels `gm` calls, in graph order."""
    return [n.args[2] for n in gm.graph.nodes if n.op == "call_function" and kernel_kind(n) == "pointwise"]


def count_kernels(gm: fx.GraphModule) -> Dict[str, int]:
    counts = dict.fromkeys(KERNEL_KINDS, 0)
    for node in gm.graph.nodes:
        if launches_kernel(node):
            counts[kernel_kind(node)] += 1
    return counts
