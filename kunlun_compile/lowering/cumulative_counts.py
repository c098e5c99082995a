"""`cumsum(histc(x))` as one count: the running total up to bin e is the number of elements in bins 0..e.

transformers' MoE dispatch turns its tokens-per-expert histogram into group offsets with a cumsum; as two
kernels (a row of counts per bin, then a scan over the bins) they cost a launch each at decode.  Counted
directly, offsets[e] = #{j : x[j] in [min, max] and bin(x[j]) <= e}, it is one row kernel of `bins` rows,
as histc alone is.  The bin of an element is computed as the histc rule computes it (lowering/isel_reduce.py,
torch's formula: (x - min) * bins / (max - min) in x's float dtype, truncated, the last bin taking x == max);
counts are integers, exact in any dtype the cumsum asks for.  Float inputs only (the integer histc divides
in integer arithmetic); other forms stay as they were.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_emit import emit
from .isel_reduce import histc_params, why_not_reducible

aten = torch.ops.aten


def cumulative_counts(graph: fx.Graph) -> int:
    """Rewrite each `cumsum(histc(x), 0)` whose histogram is read only by the cumsum; returns how many."""
    done = 0
    for scan in list(graph.nodes):
        if scan.op != "call_function" or scan.target is not aten.cumsum.default:
            continue
        hist = scan.args[0]
        if not isinstance(hist, fx.Node) or hist.target is not aten.histc.default or len(hist.users) != 1:
            continue
        x = hist.args[0]
        if why_not_reducible(hist) is not None or not x.meta["val"].dtype.is_floating_point:
            continue
        if scan.args[1] not in (0, -1) or scan.kwargs.get("dtype", scan.args[2] if len(scan.args) > 2 else None) \
                not in (None, torch.int32, torch.int64, torch.float32, torch.float64):
            continue
        with graph.inserting_before(scan):
            running = _running_counts(graph, x, *histc_params(hist.args, hist.kwargs))
            # converted per row before the squeeze: the conversion joins the counting kernel
            out = emit(graph, aten._to_copy.default, (running,), dict(dtype=scan.meta["val"].dtype))
            out = emit(graph, aten.squeeze.dim, (out, 1))
        scan.replace_all_uses_with(out)
        graph.erase_node(scan)
        graph.erase_node(hist)
        done += 1
    return done


def _running_counts(graph: fx.Graph, x: fx.Node, bins: int, lo: float, hi: float) -> fx.Node:
    """int64 [bins, 1]: the elements of x in bins 0..e, for each e."""
    def e(target, *args, **kwargs):
        return emit(graph, target, args, kwargs, like=x)

    pos = e(aten.div.Tensor, e(aten.mul.Tensor, e(aten.sub.Tensor, x, lo), bins), hi - lo)
    at = e(aten._to_copy.default, pos, dtype=torch.int64)  # truncation: floor for the in-range positions
    # x == max falls in the last bin (an element past max is outside: its bin does not count).  No 0-dim
    # constant tensor: one made on the CPU is a host copy inside a CUDA graph capture (found on the H200)
    at = e(aten.clamp_max.default, at, bins - 1)
    inside = e(aten.bitwise_and.Tensor, e(aten.ge.Scalar, x, lo), e(aten.le.Scalar, x, hi))  # NaN: in no bin
    upto = e(aten.arange.default, bins, dtype=torch.int64, device=x.meta["val"].device)
    hit = e(aten.bitwise_and.Tensor, e(aten.unsqueeze.default, inside, 0),
            e(aten.le.Tensor, e(aten.unsqueeze.default, at, 0), e(aten.unsqueeze.default, upto, 1)))
    return e(aten.sum.dim_IntList, hit, [1], True)
