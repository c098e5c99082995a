"""One canonical spelling for the graph noise that does not change a result.

The same function runs over the target graph and over every traced pattern,
so a pattern matches whatever spelling the model's code produced:
- `_unsafe_view` becomes `view` (after functionalization they mean the same),
- `_to_copy` loses `layout`/`device` keywords that restate the input's,
- chains of permutes are composed, and dropped when they cancel; a 2-D tensor's transpose in any spelling is
  `t` (`x @ w.T` is then the linear layer `F.linear(x, w)` decomposes to),
- chains of views of a contiguous tensor collapse to one view,
- a scalar overload is its `.Tensor` overload (`x.add_(eps)` in torch's own decompositions, functionalized,
  is `add.Scalar`; `x + eps` in model code is `add.Tensor` with a number), and an in-place op on a value
  nothing else reads is its functional form (a decomposition runs below functionalization when a pattern is
  traced, so `F.rms_norm`'s `add_` stays in place there),
- a dimension argument is negative (`softmax(x, 1)` on a 2-D x is `softmax(x, -1)`), and written out
  where it defaults to the last (`topk(x, k)` is `topk(x, k, -1, True, True)`),
- `x.new_empty(x.shape)` of a contiguous x is `empty_like(x)`,
- `unsqueeze(x, d).squeeze(d)` is x,
- symbolic sizes are read off the graph's inputs,
- arithmetic in the patterns' spelling (`algebra.py`: `x * x` is `x.pow(2)`, `1 / sqrt` is `rsqrt`, ...;
  put back after the fusion passes wherever nothing fused it),
then `cleanup.py`'s merge of equal views and no-op removal, and dead-code elimination.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..utils import recompile
from . import algebra
from .cleanup import remove_noop_ops

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_contiguous(node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and known_contiguous(v)


def known_contiguous(v: torch.Tensor) -> bool:
    """Row-major contiguous for every size (decided without adding shape guards)."""
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


def _as_t(node: fx.Node) -> bool:
    """A 2-D tensor's transpose in any spelling (`w.T` is `permute(w, [1, 0])`, `w.transpose(0, 1)`, `w.mT`) is
    `t(w)`, as `F.linear` decomposes: the linear rules then see `x @ w.T` as the linear layer it is."""
    src = _val(node.args[0]) if node.args else None
    if not isinstance(src, torch.Tensor) or src.dim() != 2:
        return False
    if node.target is aten.permute.default:
        swaps = list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    else:
        swaps = len(node.args) == 3 and {d % 2 for d in node.args[1:3] if isinstance(d, int)} == {0, 1}
    if not swaps:
        return False
    node.target, node.args, node.kwargs = aten.t.default, (node.args[0],), {}
    return True


def _compose_permutes(node: fx.Node) -> bool:
    inner = node.args[0]
    if not (isinstance(inner, fx.Node) and inner.target is aten.permute.default):
        return False
    p, q = list(inner.args[1]), list(node.args[1])
    composed = [p[i] for i in q]
    node.args = (inner.args[0], composed)
    return True


# op -> position of its dimension argument (an int or a list of ints), counted on the first input's rank
_DIM_ARGUMENTS = {
    aten._softmax.default: 1, aten._log_softmax.default: 1, aten.topk.default: 2, aten.cat.default: 1,
    aten.stack.default: 1, aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.amax.default: 1, aten.amin.default: 1,
    aten.max.dim: 1, aten.min.dim: 1, aten.argmax.default: 1, aten.gather.default: 1, aten.sort.default: 1,
    aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.cumsum.default: 1, aten.slice.Tensor: 1,
    aten.logsumexp.default: 1,
}


# `op.Scalar(x, number)` computes what `op.Tensor(x, number)` does (a number is a wrapped scalar either way)
_SCALAR_OVERLOADS = {aten.add.Scalar: aten.add.Tensor, aten.sub.Scalar: aten.sub.Tensor,
                     aten.mul.Scalar: aten.mul.Tensor, aten.div.Scalar: aten.div.Tensor}


_IN_PLACE = {aten.add_.Scalar: aten.add.Tensor, aten.add_.Tensor: aten.add.Tensor,
             aten.mul_.Scalar: aten.mul.Tensor, aten.mul_.Tensor: aten.mul.Tensor,
             aten.sub_.Scalar: aten.sub.Tensor, aten.sub_.Tensor: aten.sub.Tensor,
             aten.div_.Scalar: aten.div.Tensor, aten.div_.Tensor: aten.div.Tensor}


def _tensor_overload(node: fx.Node) -> bool:
    target = _SCALAR_OVERLOADS.get(node.target)
    if target is None and node.target in _IN_PLACE:
        mutated = node.args[0]
        # only an intermediate that this op alone reads: nothing can observe the mutation
        if isinstance(mutated, fx.Node) and mutated.op == "call_function" and len(mutated.users) == 1:
            target = _IN_PLACE[node.target]
    if target is None or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    node.target = target
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
    return True


def _rank(node: fx.Node):
    first = node.args[0]
    if isinstance(first, (list, tuple)):  # cat / stack: the tensors' rank (stack adds one dimension)
        first = first[0] if first else None
        extra = 1 if node.target is aten.stack.default else 0
    else:
        extra = 0
    v = _val(first)
    return v.dim() + extra if isinstance(v, torch.Tensor) else None


# topk's defaulted arguments written out (`topk(x, k, dim=1)` on a 2-D x and a pattern's `topk(x, k)` are
# recorded with and without a dim): both read `-1`
_TOPK_DEFAULTS = (("dim", -1), ("largest", True), ("sorted", True))


def _topk_in_full(node: fx.Node) -> bool:
    """`topk(x, k, dim, largest, sorted)` with every argument positional: `sorted=False` written or not must not
    change where the other arguments sit (a rule may leave `sorted` free: best first is one valid order)."""
    if len(node.args) == 5 or len(node.args) < 2:
        return False
    given = dict(zip(("dim", "largest", "sorted"), node.args[2:]), **node.kwargs)
    node.args = (*node.args[:2], *(given.get(name, default) for name, default in _TOPK_DEFAULTS))
    node.kwargs = {}
    return True


def _negative_dims(node: fx.Node) -> bool:
    pos = _DIM_ARGUMENTS.get(node.target)
    if pos is None:
        return False
    args = list(node.args)
    dim = args[pos] if pos < len(args) else node.kwargs.get("dim")
    rank = _rank(node)
    if rank is None or dim is None:
        return False
    if isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim < rank:
        new = dim - rank
    elif isinstance(dim, (list, tuple)) and dim and all(isinstance(d, int) and 0 <= d < rank for d in dim):
        new = type(dim)(d - rank for d in dim)
    else:
        return False
    if pos < len(args):
        args[pos] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "dim": new}
    return True


def _as_empty_like(node: fx.Node) -> bool:
    """`x.new_empty(x.shape)` of a contiguous x is `empty_like(x)`: the same uninitialised buffer, one spelling."""
    src = node.args[0]
    v, out = _val(src), _val(node)
    if not (isinstance(v, torch.Tensor) and isinstance(out, torch.Tensor) and known_contiguous(v)):
        return False
    same = out.dtype == v.dtype and out.device == v.device and out.dim() == v.dim() and all(
        statically_known_true(a == b) for a, b in zip(out.shape, v.shape))
    if not same or set(node.kwargs) - {"dtype", "layout", "device", "pin_memory"}:
        return False
    node.target, node.args, node.kwargs = aten.empty_like.default, (src,), {}
    return True


def _squeeze_of_unsqueeze(node: fx.Node) -> bool:
    """`unsqueeze(x, d).squeeze(d)` is x (the dim it drops is the size-1 dim just added): functionalization
    writes it when model code updates a squeezed view in place (`bmm(...).squeeze(1).add_(bias)`)."""
    inner = node.args[0] if node.args else None
    if not (isinstance(inner, fx.Node) and inner.target is aten.unsqueeze.default and len(node.args) == 2):
        return False
    v = _val(inner)
    if not isinstance(v, torch.Tensor) or not isinstance(node.args[1], int) or not isinstance(inner.args[1], int):
        return False
    if node.args[1] % v.dim() != inner.args[1] % v.dim():
        return False
    node.replace_all_uses_with(inner.args[0])
    return True


def _sizes_read_from_inputs(gm: fx.GraphModule) -> int:
    """`sym_size(t, d)` reads its symbol off the first graph input that has it as a dim.  A replacement traced
    under dynamic shapes reads sizes off whatever value it had (a table's `unsqueeze`): that extra user of a
    value inside a later pattern would look like a value escaping the match."""
    inputs = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        v = _val(ph)
        for d, size in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and size.node.expr.is_symbol:
                inputs.setdefault(size.node.expr, (ph, d))
    edits = 0
    for node in gm.graph.find_nodes(op="call_function", target=aten.sym_size.int):
        size = _val(node)
        source = inputs.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        if source is not None and tuple(node.args) != source:
            node.args = source
            edits += 1
    return edits


MAX_PASSES = 4  # a pass's last steps (no-op removal, algebra) can leave work for the next; two suffice today


def canonicalize(gm: fx.GraphModule) -> int:
    """Rewrite `gm` in place into the canonical spelling, to a fixpoint; returns how many edits.  A fixpoint,
    not one pass: a pattern is canonicalized once where the target graph is canonicalized before every family's
    pass, and one pass can leave a chain it made (a no-op removed between two views) for the next."""
    edits = 0
    for _ in range(MAX_PASSES):
        made = _canonical_pass(gm)
        edits += made
        if not made:
            break
    return edits


def _canonical_pass(gm: fx.GraphModule) -> int:
    edits = _sizes_read_from_inputs(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._unsafe_view.default:
            node.target = aten.view.default
            edits += 1
        if node.target is torch.ops.prims.convert_element_type.default:  # inductor's post-grad cast
            node.target, node.args, node.kwargs = aten._to_copy.default, node.args[:1], {"dtype": node.args[1]}
            edits += 1
        if node.target is aten.topk.default:
            edits += _topk_in_full(node)
        edits += _tensor_overload(node)
        edits += _negative_dims(node)
        if node.target is aten._to_copy.default:
            edits += _drop_restated_copy_kwargs(node)
        elif node.target is aten.permute.default:
            edits += _compose_permutes(node) + _as_t(node)
        elif node.target is aten.transpose.int:
            edits += _as_t(node)
        elif node.target is aten.new_empty.default:
            edits += _as_empty_like(node)
        elif node.target is aten.squeeze.dim:
            edits += _squeeze_of_unsqueeze(node)
        elif node.target is aten.view.default:
            inner = node.args[0]
            # collapsing is only safe from a contiguous source: any view of it is valid
            if isinstance(inner, fx.Node) and inner.target is aten.view.default and _is_contiguous(inner.args[0]):
                node.args = (inner.args[0], *node.args[1:])
                edits += 1
    edits += algebra.normalise(gm)
    edits += remove_noop_ops(gm, None).matches
    gm.graph.eliminate_dead_code()
    recompile(gm)
    return edits
