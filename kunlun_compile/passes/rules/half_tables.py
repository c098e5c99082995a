"""`kunlun::qk_norm_rope` reads the half-width tables a widening was built from.

The rotary primitive takes full-width tables, so a half-width rotation (vLLM's `forward_native`, GPT-J pairs
against one angle per pair, a complex `freqs_cis`) was given `cat((cos, cos))` or pairs stacked and
flattened (`rotary.widened_tables`).  Once a prologue rule has fused the rotation, those widenings are
kernels of their own -- two per layer where each layer unsqueezes its tables -- that the op does not need:
it reads one angle per pair (`half_width`), at any column stride (a complex table's real parts, 2 apart).

The step walks back from the op's cos and sin through the views, casts and broadcasts the replacement put
between (none of them touches the last dim), finds the widening, and replays the same chain on its source
with the last dim halved.  A table whose chain it does not know is left as it is.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.fx as fx

aten = torch.ops.aten
QK_NORM_ROPE = torch.ops.kunlun.qk_norm_rope.default
_NEOX, _HALF_WIDTH = 8, 10  # argument positions

# ops that move, broadcast or cast rows without touching the last dim (checked per node)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_ALONG_DIM = (aten.transpose.int, aten.select.int, aten.slice.Tensor, aten.unsqueeze.default)


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _keeps_last_dim(node: fx.Node) -> bool:
    src, out = _val(node.args[0]), _val(node)
    if src is None or out is None or src.dim() == 0 or out.dim() == 0 or not _same(src.shape[-1], out.shape[-1]):
        return False
    if node.target in _RESHAPES or node.target is aten.expand.default:
        return True
    if node.target is aten._to_copy.default:
        return set(node.kwargs) <= {"dtype"}
    if node.target is aten.clone.default:  # a table shared over the batch, expanded and reshaped
        return set(node.kwargs) <= {"memory_format"}
    if node.target in _ALONG_DIM:
        dims = node.args[1:3] if node.target is aten.transpose.int else node.args[1:2]
        rank = out.dim() if node.target is aten.unsqueeze.default else src.dim()
        return all(isinstance(d, int) and d % rank != rank - 1 for d in dims)
    return False


def _same(a, b) -> bool:
    return a is b or (isinstance(a, int) and isinstance(b, int) and a == b) or str(a) == str(b)


def _widening_source(node: fx.Node, neox: bool) -> Optional[fx.Node]:
    """x of `cat((x, x), -1)` (neox), or of `stack((x, x), -1)` flattened (pairs)."""
    if neox and node.target is aten.cat.default:
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        rank = _val(node).dim()
        if len(parts) == 2 and parts[0] is parts[1] and dim % rank == rank - 1:
            return parts[0]
    if not neox and node.target in _RESHAPES and isinstance(node.args[0], fx.Node) \
            and node.args[0].target is aten.stack.default:
        stack = node.args[0]
        parts, dim = stack.args[0], stack.args[1] if len(stack.args) > 1 else 0
        src, out = _val(stack.args[0][0]), _val(node)
        if (len(parts) == 2 and parts[0] is parts[1] and dim in (-1, src.dim())
                and list(map(str, out.shape[:-1])) == list(map(str, src.shape[:-1]))):
            return parts[0]
    return None


def _chain_to_widening(table: fx.Node, neox: bool) -> Optional[Tuple[fx.Node, List[fx.Node]]]:
    """(the half-width source, the nodes from the widening down to `table`, widening excluded)."""
    chain, node = [], table
    while isinstance(node, fx.Node):
        source = _widening_source(node, neox)
        if source is not None:
            return source, chain[::-1]
        if node.op != "call_function" or not _keeps_last_dim(node):
            return None
        chain.append(node)
        node = node.args[0]
    return None


def _halved_sizes(sizes, full) -> Optional[list]:
    """A view's or expand's sizes with the last one (the full width, or -1) halved."""
    last = sizes[-1]
    if isinstance(last, int) and last == -1:
        return list(sizes)
    if isinstance(last, int) and isinstance(full, int) and last == full:
        return list(sizes[:-1]) + [full // 2]
    return None


def _replay(graph: fx.Graph, source: fx.Node, chain: List[fx.Node]) -> Optional[fx.Node]:
    node = source
    for old in chain:
        args = list(old.args)
        if old.target in _RESHAPES or old.target is aten.expand.default:
            sizes = _halved_sizes(args[1], _val(old).shape[-1])
            if sizes is None:
                return None
            args[1] = sizes
        args[0] = node
        try:  # a view the widened table allowed may not be one of its strided source
            val = old.target(*fx.node.map_arg(tuple(args), lambda n: n.meta["val"]), **old.kwargs)
        except RuntimeError:
            return None
        node = graph.call_function(old.target, tuple(args), dict(old.kwargs))
        node.meta["val"] = val
    return node


def read_half_tables(gm: fx.GraphModule) -> int:
    """Every qk_norm_rope whose cos and sin are widenings: given their sources, `half_width`."""
    changed = 0
    for op in [n for n in gm.graph.nodes if n.target is QK_NORM_ROPE]:
        args = list(op.args) + [False] * (_HALF_WIDTH + 1 - len(op.args))
        if args[_HALF_WIDTH] or not isinstance(args[_NEOX], bool):
            continue
        found = [_chain_to_widening(t, args[_NEOX]) for t in args[4:6]]
        if any(f is None for f in found):
            continue
        with gm.graph.inserting_before(op):
            halves = [_replay(gm.graph, source, chain) for source, chain in found]
        if any(h is None for h in halves):
            continue  # the nodes made for the other table are dead: dead_code erases them
        args[4:6], args[_HALF_WIDTH] = halves, True
        op.args = tuple(args)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
    return changed
