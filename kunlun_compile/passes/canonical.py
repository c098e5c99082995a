"""One canonical spelling for the graph noise that does not change a result.

The same function runs over the target graph and over every traced pattern,
so a pattern matches whatever spelling the model's code produced:
- `_unsafe_view` becomes `view` (after functionalization they mean the same),
- `_to_copy` loses `layout`/`device` keywords that restate the input's,
- chains of permutes are composed, and dropped when they cancel,
- chains of views of a contiguous tensor collapse to one view,
then the no-op removal of `cleanup.py` and dead-code elimination.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .cleanup import remove_noop_ops

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_contiguous(node) -> bool:
    """Row-major contiguous for every size (decided without adding shape guards)."""
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return False
    expected = 1
    for size, stride in reversed(list(zip(v.shape, v.stride()))):
        if not (statically_known_true(size == 1) or statically_known_true(stride == expected)):
            return False
        expected = expected * size
    return True


def _drop_restated_copy_kwargs(node: fx.Node) -> bool:
    src, kw = _val(node.args[0]), dict(node.kwargs)
    if not isinstance(src, torch.Tensor):
        return False
    changed = False
    if kw.get("layout") == torch.strided:
        kw.pop("layout")
        changed = True
    if "device" in kw and kw["device"] == src.device:
        kw.pop("device")
        changed = True
    if changed:
        node.kwargs = kw
    return changed


def _compose_permutes(node: fx.Node) -> bool:
    inner = node.args[0]
    if not (isinstance(inner, fx.Node) and inner.target is aten.permute.default):
        return False
    p, q = list(inner.args[1]), list(node.args[1])
    composed = [p[i] for i in q]
    node.args = (inner.args[0], composed)
    return True


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite `gm` in place into the canonical spelling; returns how many edits."""
    edits = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._unsafe_view.default:
            node.target = aten.view.default
            edits += 1
        if node.target is aten._to_copy.default:
            edits += _drop_restated_copy_kwargs(node)
        elif node.target is aten.permute.default:
            edits += _compose_permutes(node)
        elif node.target is aten.view.default:
            inner = node.args[0]
            # collapsing is only safe from a contiguous source: any view of it is valid
            if isinstance(inner, fx.Node) and inner.target is aten.view.default and _is_contiguous(inner.args[0]):
                node.args = (inner.args[0], *node.args[1:])
                edits += 1
    edits += remove_noop_ops(gm, None).matches
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return edits
