"""Complex arithmetic as pairs of real values, so that the lowering can generate it.

Rotaries written with complex numbers (DeepSeek-V2, Llama4: `freqs_cis = polar(ones, freqs)`, then
`view_as_real(view_as_complex(q.reshape(..., -1, 2)) * freqs_cis)`) leave ATen ops the generated
kernels cannot hold: the kernels compute in real dtypes only.  Each complex value of such a region is
rebuilt as its real and imaginary parts (float32 for complex64):
- `view_as_complex(x)`: x[..., 0] and x[..., 1] (views);
- `polar(r, theta)`: r * cos(theta) and r * sin(theta), as torch computes it;
- `mul`: (a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re); a real operand is promoted as torch does
  (imaginary part 0);
- views (unsqueeze, reshape, expand, slice, select, transpose, permute): the same view of each part;
- `view_as_real(c)`: stack((re, im), dim=-1), where the region ends.
A region is rewritten only when every complex value in it is one of these and is read only inside it
(nothing complex leaves); otherwise it stays ATen, as before.  Precision: the same operations in the same
order as torch's complex kernels; where a compiler contracts `a*b - c*d` into a fused multiply-add the
results may differ by one unit (tested against eager within the models' limits).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.fx as fx

from .graph_emit import emit

aten = torch.ops.aten
PART_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}
VIEWS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
         aten.expand.default, aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.permute.default,
         aten.t.default, aten.alias.default, aten.clone.default}
Parts = Tuple[fx.Node, fx.Node]


def complex_as_pairs(graph: fx.Graph) -> int:
    """Rewrite the regions ending in `view_as_real` that can be (regions may share values: the q and k
    rotations read one `freqs_cis`); returns how many ends were rewritten."""
    regions = {}
    for end in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.view_as_real.default]:
        region = _region(end.args[0])
        if region is not None:
            regions[end] = region
    while regions:  # drop the ends whose values are also read by something that stays complex
        inside = set().union(*regions.values()) | set(regions)
        leaking = {n for r in regions.values() for n in r if any(u not in inside for u in n.users)}
        if not leaking:
            break
        regions = {e: r for e, r in regions.items() if not r & leaking}
    parts: Dict[fx.Node, Parts] = {}
    for end in regions:
        with graph.inserting_before(end):
            re, im = _parts(graph, end.args[0], parts)
            stacked = emit(graph, aten.stack.default, ([re, im], -1))
        end.replace_all_uses_with(stacked)
    if regions:
        graph.eliminate_dead_code()
    return len(regions)


def _is_complex(n: Any) -> bool:
    return isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()


def _supported(n: fx.Node) -> bool:
    if n.op != "call_function" or n.meta["val"].dtype not in PART_DTYPES:
        return False
    if n.target in (aten.view_as_complex.default, aten.polar.default):
        return True
    if n.target is aten.mul.Tensor:  # complex times complex, or times a real tensor or number
        return all(_is_complex(a) or isinstance(a, (int, float)) or isinstance(a, fx.Node)
                   and a.meta["val"].dtype.is_floating_point for a in n.args[:2])
    return n.target in VIEWS and _is_complex(n.args[0])


def _region(root: fx.Node) -> Optional[Set[fx.Node]]:
    """The complex nodes `root` is computed from (up to real inputs), or None if one is not supported."""
    seen: Set[fx.Node] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if not _is_complex(n) or not _supported(n):
            return None
        seen.add(n)
        stack += [a for a in n.all_input_nodes if _is_complex(a)]
    return seen


def _parts(graph: fx.Graph, n: fx.Node, memo: Dict[fx.Node, Parts]) -> Parts:
    if n in memo:
        return memo[n]
    t, a = n.target, n.args
    if t is aten.view_as_complex.default:
        out = (emit(graph, aten.select.int, (a[0], -1, 0)), emit(graph, aten.select.int, (a[0], -1, 1)))
    elif t is aten.polar.default:
        r, theta = a[0], a[1]
        out = (emit(graph, aten.mul.Tensor, (r, emit(graph, aten.cos.default, (theta,)))),
               emit(graph, aten.mul.Tensor, (r, emit(graph, aten.sin.default, (theta,)))))
    elif t is aten.mul.Tensor:
        # a real operand is a complex one with a zero imaginary part, as torch promotes it (inf * 0 is NaN there)
        (xr, xi), (yr, yi) = (_parts(graph, v, memo) if _is_complex(v) else (v, 0.0) for v in a[:2])
        mul = aten.mul.Tensor
        out = (emit(graph, aten.sub.Tensor, (emit(graph, mul, (xr, yr)), emit(graph, mul, (xi, yi)))),
               emit(graph, aten.add.Tensor, (emit(graph, mul, (xr, yi)), emit(graph, mul, (xi, yr)))))
    else:  # a view: the same view of each part
        src_r, src_i = _parts(graph, a[0], memo)
        rest = tuple(a[1:])
        out = (emit(graph, t, (src_r,) + rest, n.kwargs), emit(graph, t, (src_i,) + rest, n.kwargs))
    memo[n] = out
    return out
