"""Cleanup passes: remove work that does nothing, so patterns see less noise.

After functionalization, graphs carry views to the same shape, casts to the
dtype a tensor already has and slices over a whole dimension.  Removing them
is always safe for views (they alias anyway).  A same-dtype copy is removed
only when its result is not returned (dropping it must not make a returned
tensor alias an input) and no view is taken of it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .manager import PassContext, PassOutcome

aten = torch.ops.aten
prims = torch.ops.prims

# detach: inference graphs have no autograd to cut (vLLM's norms pass `weight.data` through it)
_SAME_SHAPE_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
                     aten.alias.default, aten.detach.default}
# lift_fresh_copy: a fresh copy of a constant (`torch.tensor(...)` in model code) made every call; a
# functional inference graph never writes to it, so the constant itself serves
_COPIES = {aten.clone.default, aten._to_copy.default, prims.convert_element_type.default,
           aten.lift_fresh_copy.default}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _same_shape(a, b) -> bool:
    if len(a.shape) != len(b.shape):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


def _is_noop_view(node: fx.Node) -> bool:
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if node.target in _SAME_SHAPE_VIEWS:
        return _same_shape(src, out)
    if node.target is aten.permute.default:
        return list(node.args[1]) == list(range(len(node.args[1])))
    if node.target is aten.slice.Tensor:  # same shape and offset: the same elements
        return _same_shape(src, out) and statically_known_true(out.storage_offset() == src.storage_offset())
    return False


def _is_noop_copy(node: fx.Node) -> bool:
    if node.target not in _COPIES:
        return False
    src, out = _val(node.args[0]), _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if src.dtype != out.dtype or src.device != out.device or not _same_shape(src, out):
        return False
    if any(statically_known_true(a != b) for a, b in zip(src.stride(), out.stride())):
        return False
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    if src.requires_grad != out.requires_grad:
        return False
    for user in node.users:
        if user.op == "output":
            return False
        if isinstance(user.target, torch._ops.OpOverload) and user.target.is_view:
            return False
    return True


_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}


# Pure views that are merged when equal: functionalization re-creates `getitem`/`view`/`transpose`/`slice` of a
# buffer at every use (vLLM's CPU linears write into one; its transformers backend transposes the heads after
# the view), and model code splits one qkv twice.
_MERGED = _SPLITS | {aten.view.default, aten.slice.Tensor, aten.transpose.int, aten.permute.default, operator.getitem}


def _merge_key(node: fx.Node):
    """Two equal splits, views, slices or tuple items of the same value are one.  Nothing else is merged:
    a merged value becomes shared by two patterns' territories (layers sharing one `cos.unsqueeze`,
    a mask's `ids < vocab` also used elsewhere), which blocks both fusions."""
    if node.op != "call_function" or node.target not in _MERGED:
        return None
    return (node.target, repr(node.args), repr(sorted(node.kwargs.items())))


def merge_duplicates(gm: fx.GraphModule) -> int:
    """Duplicate views: model code that splits the same qkv twice (vLLM's Qwen3 views q and k from two
    `split` calls), or a graph that re-creates a view at each use, must look like the one value a pattern
    was traced from."""
    seen, merged = {}, 0
    for node in list(gm.graph.nodes):
        key = _merge_key(node)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def remove_noop_ops(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    removed = merge_duplicates(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if _is_noop_view(node) or _is_noop_copy(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    return PassOutcome(matches=removed)


# (narrow, wide): every value of `narrow` is exactly a value of `wide`
_EXACT_WIDENINGS = {(torch.int8, torch.int16), (torch.int8, torch.int32), (torch.int8, torch.int64),
                    (torch.int16, torch.int32), (torch.int16, torch.int64), (torch.int32, torch.int64),
                    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                    (torch.bfloat16, torch.float64), (torch.float32, torch.float64)}


def fold_cast_round_trips(gm: fx.GraphModule) -> int:
    """`x.to(wide).to(x.dtype)` is x where `wide` holds every value of x's dtype exactly: a replacement that
    restores a primitive's int64 ids from a kernel's int32 ones, then the model's own cast back to int32."""
    folded = 0
    for node in list(gm.graph.nodes):
        inner = node.args[0] if node.target is aten._to_copy.default and node.args else None
        if not (isinstance(inner, fx.Node) and inner.target is aten._to_copy.default
                and set(node.kwargs) <= {"dtype"} and set(inner.kwargs) <= {"dtype"}):
            continue
        x, wide, out = _val(inner.args[0]), _val(inner), _val(node)
        if (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dtype == out.dtype
                and (x.dtype, wide.dtype) in _EXACT_WIDENINGS):
            node.replace_all_uses_with(inner.args[0])
            gm.graph.erase_node(node)
            folded += 1
    return folded


def dead_code(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return PassOutcome(matches=before - len(gm.graph.nodes))
