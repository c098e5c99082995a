"""Building new nodes in a graph the lowering rewrites: each gets its `val` by running the op on its
arguments' values (under their fake mode), as a traced node has."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode


def emit(graph: fx.Graph, target, args: tuple, kwargs: Optional[dict] = None, like: Optional[fx.Node] = None
         ) -> fx.Node:
    """A call of `target` inserted at the graph's insertion point, with its meta value (computed in the fake
    mode of its tensor arguments, or of `like` for a call that has none, as `arange`)."""
    node = graph.call_function(target, args, dict(kwargs or {}))
    vals = _vals(args) + ([like.meta["val"]] if like is not None else [])
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    real_args = _substitute(args)
    if mode is not None:
        with mode:
            node.meta["val"] = target(*real_args, **(kwargs or {}))
    else:
        node.meta["val"] = target(*real_args, **(kwargs or {}))
    return node


def _vals(args) -> List[Any]:
    out: List[Any] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _vals(a)
        elif isinstance(a, fx.Node):
            out.append(a.meta["val"])
    return out


def _substitute(a):
    if isinstance(a, (list, tuple)):
        return type(a)(_substitute(x) for x in a)
    return a.meta["val"] if isinstance(a, fx.Node) else a
