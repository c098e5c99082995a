"""Reductions over dims of static size 1 as element-wise nodes.

A sum / mean / max / min / product or a prefix scan over a dim of size 1 is its input in the result's dtype
(a bool cumsum counts in int64; a half sum rounds an fp32 accumulator holding one value back to itself); a
softmax over one element is exp(x - x) (1, or NaN where x is infinite or NaN, as eager's max-subtracted
form gives), a log-softmax x - x (0, or NaN).  Squeezed where the dims are not kept.  As element-wise nodes
they join their neighbours' kernel instead of a row kernel of length 1, which the lowering does not make
(transformers' packed-sequence cumsum at decode, one token: four kernels more on the GPU).  A variance over
one element stays as it is (NaN by its correction, with eager's warning).
"""
from __future__ import annotations

from typing import List

import torch
import torch.fx as fx

from .graph_emit import emit

aten = torch.ops.aten
AS_CONVERSION = {aten.cumsum.default, aten.cumprod.default, aten.sum.dim_IntList, aten.mean.dim, aten.amax.default,
                 aten.amin.default, aten.prod.dim_int}
SOFTMAXES = {aten._softmax.default, aten._log_softmax.default}
ONE_DIM = {aten.cumsum.default, aten.cumprod.default, aten.prod.dim_int, *SOFTMAXES}


def unit_reductions_as_conversions(graph: fx.Graph) -> int:
    """Rewrite each reduction whose reduced dims all have static size 1; returns how many."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in AS_CONVERSION | SOFTMAXES:
            continue
        x, out = node.args[0], node.meta.get("val")
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor) or val.dim() == 0:
            continue
        dims = _reduced_dims(node, val.dim())
        if not all(isinstance(val.shape[d], int) and val.shape[d] == 1 for d in dims):
            continue
        with graph.inserting_before(node):
            value = x
            if node.target in SOFTMAXES:
                value = emit(graph, aten.sub.Tensor, (x, x))
                if node.target is aten._softmax.default:
                    value = emit(graph, aten.exp.default, (value,))
            value = emit(graph, aten._to_copy.default, (value,), dict(dtype=out.dtype))
            if out.dim() < val.dim():
                value = emit(graph, aten.squeeze.dims, (value, dims))
        node.replace_all_uses_with(value)
        graph.erase_node(node)
        done += 1
    return done


def _reduced_dims(node: fx.Node, rank: int) -> List[int]:
    """The dims the reduction reduces, normalised (no dims given: all of them)."""
    if node.target in ONE_DIM:
        dims = [node.args[1] if len(node.args) > 1 else node.kwargs["dim"]]
    else:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(rank)) if not dims else [dims] if isinstance(dims, int) else list(dims)
    return sorted({d % rank for d in dims})
