"""Instruction selection for reductions: ATen reductions -> KIR row-kernel instructions.

Each rule builds its op from `reduce.sum/max/min` and element-wise instructions, in the order and
precision eager computes it: half inputs accumulate in fp32, a mean is the sum divided by the row
length, a variance is two passes (mean, then the mean of squared deviations; eager's Welford gives
the same value up to rounding), softmax subtracts the row max before `exp` and divides by the sum,
layer norm is `(x - mean) * rstd * w + b`.  The sums are not eager's bit for bit (another
addition order), nor is softmax's normalisation (a per-row reciprocal, then a multiply); every
other element-wise step around them is.

A reduction is lowerable when it reduces one dim of static size >= 2 (`why_not_reducible`); the
cluster step puts it in a row kernel with its element-wise producers and consumers.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .kir import opmath
from .refused import Refused

aten = torch.ops.aten


def _dims(node: fx.Node) -> Optional[List[int]]:
    """The reduced dims of `node`, normalised to its input's rank; None for an op without a dims argument."""
    x = node.args[0].meta["val"]
    target = node.target
    if target in (aten._softmax.default, aten._log_softmax.default, aten._safe_softmax.default):
        dims = [node.args[1]]
    elif target is aten.native_layer_norm.default:
        dims = [x.dim() - k for k in range(len(node.args[1]), 0, -1)]
    else:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return list(range(x.dim()))
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims:
            return list(range(x.dim()))
    return sorted(d % max(x.dim(), 1) for d in dims)


def reduce_dim(node: fx.Node) -> int:
    return row_space(node)[1]


def row_space(node: fx.Node) -> Tuple[Tuple, int]:
    """(the row kernel's space, its reduced dim): the input's shape (ints and SymInts) and the reduced dim; for
    histc, one row per bin over all the input's elements ([bins, N], reducing dim 1)."""
    shape = tuple(node.args[0].meta["val"].shape)
    if node.target is aten.histc.default:
        return (histc_params(node.args, node.kwargs)[0],) + shape, 1
    return shape, _dims(node)[0]


def histc_params(args: Sequence, kwargs: Dict) -> Tuple[int, float, float]:
    """histc's (bins, min, max), given by position or name, with torch's defaults."""
    names, defaults = ("bins", "min", "max"), (100, 0, 0)
    return tuple(args[1 + k] if len(args) > 1 + k else kwargs.get(name, d)
                 for k, (name, d) in enumerate(zip(names, defaults)))


def why_not_reducible(node: fx.Node) -> Optional[str]:
    """None if `node` is a reduction this lowering handles (one dim of static size >= 2), else why not."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or not isinstance(x.meta.get("val"), torch.Tensor):
        return "reduction of a non-tensor"
    val = x.meta["val"]
    if val.dim() == 0:
        return "reduction of a 0-dim tensor"
    if node.target is aten.histc.default:
        return _why_not_histc(node, val)
    dims = _dims(node)
    if len(dims) != 1:
        return f"reduces {len(dims)} dims (row kernels reduce one)"
    size = val.shape[dims[0]]
    if isinstance(size, int) and size < 2:  # a symbolic size is a runtime length (row.length); 0 and 1 work too
        return f"reduces a dim of size {size}"
    if not (val.dtype.is_floating_point or val.dtype in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                          torch.uint8, torch.bool)):
        return f"input dtype {val.dtype}"
    if node.target in (aten.amax.default, aten.amin.default, aten.sum.dim_IntList, aten.sum.default,
                       aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim, aten.cumsum.default) \
            or val.dtype.is_floating_point:
        return None
    return f"{node.target} of {val.dtype}"


def _why_not_histc(node: fx.Node, val: torch.Tensor) -> Optional[str]:
    bins, lo, hi = histc_params(node.args, node.kwargs)
    if val.dim() != 1:
        return "histc of a tensor of more than one dim"
    if not isinstance(bins, int) or bins < 1:
        return f"histc with {bins} bins"
    if not lo < hi:  # eager then takes the range from the data
        return f"histc with the range [{lo}, {hi}] (taken from the data)"
    if val.dtype not in (torch.float32, torch.float64, torch.int32, torch.int64):
        return f"histc of {val.dtype}"
    return None


# ---- rules: rule(builder, args, kwargs, out_dtypes, row_len) -> Value or tuple of Values ------------

def _sum(b, args, kwargs, out, n):
    acc = opmath(out) if out.is_floating_point else torch.int64
    return b.reduce("sum", b.operand(args[0], acc))


def _cumsum(b, args, kwargs, out, n):
    """Prefix sums along the row, accumulated as eager does (fp32 for half results, int64 for integers)."""
    acc = opmath(out) if out.is_floating_point else torch.int64
    return b.emit("scan.sum", acc, (b.operand(args[0], acc),))


def _histc(b, args, kwargs, out, n):
    """Counts per bin, one row per bin (`row.point`) over every element: an element in [min, max] falls in bin
    (x - min) * bins / (max - min), the last bin taking x == max, as torch computes it (float inputs in their
    own precision, integer inputs in integer arithmetic as its CUDA kernel does)."""
    x = args[0]
    bins, lo, hi = histc_params(args, kwargs)
    if x.dtype.is_floating_point:
        lo_v, hi_v = b.const(lo, x.dtype), b.const(hi, x.dtype)
        pos = b.div(b.vec("mul", b.vec("sub", x, lo_v), b.const(bins, x.dtype)), b.const(hi - lo, x.dtype))
        at = b.cast(pos, torch.int64)  # truncation: floor for the in-range (non-negative) positions
    else:
        lo_v, hi_v = b.const(int(lo), x.dtype), b.const(int(hi), x.dtype)
        wide = b.vec("sub", b.cast(x, torch.int64), b.const(int(lo), torch.int64))
        at = b.vec("idiv", b.vec("mul", wide, b.const(bins, torch.int64)), b.const(int(hi) - int(lo), torch.int64))
    last = b.const(bins - 1, torch.int64)
    at = b.select(b.vec("eq", at, b.const(bins, torch.int64)), last, at)
    inside = b.vec("and", b.vec("ge", x, lo_v), b.vec("le", x, hi_v))  # NaN: in no bin
    hit = b.vec("and", inside, b.vec("eq", at, b.emit("row.point", torch.int64)))
    return b.reduce("sum", b.cast(hit, torch.int64))


def _mean(b, args, kwargs, out, n):
    acc = opmath(out)
    return b.div(b.reduce("sum", b.operand(args[0], acc)), row_length(b, n, acc))


def _extreme(kind: str):
    def rule(b, args, kwargs, out, n):
        comp = opmath(out) if out.is_floating_point else out
        return b.reduce(kind, b.operand(args[0], comp))
    return rule


def _extreme_index(kind: str):
    """argmax/argmin: the least row position holding the max (min) -- eager's first occurrence; a NaN counts
    as the extreme (eager's too), so with one in the row it is the least position of a NaN."""
    def positions(b, x):
        m = b.reduce(kind, x)  # NaN-propagating
        hit = b.vec("eq", x, m)
        if x.dtype.is_floating_point:
            hit = b.vec("or", hit, b.vec("ne", x, x))
        index = b.emit("row.index", torch.int64)
        first = b.reduce("min", b.select(hit, index, b.const(torch.iinfo(torch.int64).max, torch.int64)))
        return m, first

    def rule(b, args, kwargs, out, n):
        return positions(b, b.cast(args[0], opmath(args[0].dtype)))[1]

    def both(b, args, kwargs, outs, n):  # max.dim / min.dim: (values, indices)
        return positions(b, b.cast(args[0], opmath(args[0].dtype)))
    return rule, both


_argmax, _max_dim = _extreme_index("max")
_argmin, _min_dim = _extreme_index("min")


def row_length(b, n: Any, dtype: torch.dtype, minus: int = 0):
    """The row's length (minus `minus`, at least 0) as a value: a constant, or the kernel's runtime length when
    the dim is symbolic (`row.length`)."""
    if isinstance(n, int):
        return b.const(max(n - minus, 0), dtype)
    length = b.emit("row.length", torch.int64)
    if minus:
        length = b.vec("max", b.vec("sub", length, b.const(minus, torch.int64)), b.const(0, torch.int64))
    return b.cast(length, dtype)


def _mean_and_deviation(b, x, n):
    mean = b.div(b.reduce("sum", x), row_length(b, n, x.dtype))
    return mean, b.vec("sub", x, mean)


def _variance(b, x, n, correction):
    mean, dev = _mean_and_deviation(b, x, n)
    if not float(correction).is_integer():
        raise Refused(f"var with a fractional correction {correction}")
    return b.div(b.reduce("sum", b.vec("mul", dev, dev)), row_length(b, n, x.dtype, int(correction))), mean


def _correction(kwargs) -> float:
    c = kwargs.get("correction")
    return 1 if c is None else c


def _var(b, args, kwargs, out, n):
    return _variance(b, b.operand(args[0], opmath(out)), n, _correction(kwargs))[0]


def _var_mean(b, args, kwargs, outs, n):
    return _variance(b, b.operand(args[0], opmath(outs[0])), n, _correction(kwargs))


def _softmax_parts(b, args, out):
    x = b.operand(args[0], opmath(out))
    # a NaN in x needs no NaN-propagating max: exp(x - max) is NaN there and the sum makes the row NaN
    shifted = b.vec("sub", x, b.reduce("maxnum", x))
    return shifted, b.exp(shifted)


def _softmax(b, args, kwargs, out, n):
    """exp(x - max) times the row's reciprocal sum: one correctly rounded division per row instead of one per
    element (within one fp32 unit of eager's division; the division was the kernel's costliest step)."""
    _, e = _softmax_parts(b, args, out)
    return b.vec("mul", e, b.div(b.const(1.0, e.dtype), b.reduce("sum", e)))


def _safe_softmax(b, args, kwargs, out, n):
    """softmax, with 0 for a row that is -inf everywhere (attention rows that see nothing; eager's SDPA math
    path): such a row's max is -inf.  A NaN anywhere in a row still makes it NaN."""
    x = b.operand(args[0], opmath(out))
    masked = b.vec("eq", b.reduce("max", x), b.const(float("-inf"), x.dtype))
    return b.select(masked, b.const(0.0, x.dtype), _softmax(b, args, kwargs, out, n))


def _log_softmax(b, args, kwargs, out, n):
    shifted, e = _softmax_parts(b, args, out)
    return b.vec("sub", shifted, b.log(b.reduce("sum", e)))


def _layer_norm(b, args, kwargs, outs, n):
    x_node, weight, bias, eps = args[0], args[2], args[3], args[4]
    comp = opmath(outs[0])
    x = b.operand(x_node, comp)
    mean, dev = _mean_and_deviation(b, x, n)
    var = b.div(b.reduce("sum", b.vec("mul", dev, dev)), row_length(b, n, comp))
    rstd = b.math("rsqrt", b.vec("add", var, b.const(eps, comp)), form="precise")
    y = b.vec("mul", dev, rstd)
    if weight is not None:
        y = b.vec("mul", y, b.operand(weight, comp))
    if bias is not None:
        y = b.vec("add", y, b.operand(bias, comp))
    return y, mean, rstd


REDUCTIONS: Dict[Any, Callable] = {
    aten.sum.dim_IntList: _sum, aten.sum.default: _sum, aten.mean.dim: _mean, aten.mean.default: _mean,
    aten.amax.default: _extreme("max"), aten.amin.default: _extreme("min"), aten.var.correction: _var,
    aten._softmax.default: _softmax, aten._log_softmax.default: _log_softmax, aten._safe_softmax.default: _safe_softmax,
    aten.argmax.default: _argmax, aten.argmin.default: _argmin, aten.cumsum.default: _cumsum,
    aten.histc.default: _histc,
}
# Reductions with several results (the graph reads them through getitem nodes).
MULTI_OUTPUT: Dict[Any, Callable] = {aten.var_mean.correction: _var_mean,
                                     aten.native_layer_norm.default: _layer_norm,
                                     aten.max.dim: _max_dim, aten.min.dim: _min_dim}


def is_reduction(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in REDUCTIONS or node.target in MULTI_OUTPUT)


def is_result_of_reduction(node: fx.Node) -> bool:
    """A getitem picking one result of a multi-output reduction."""
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and node.args[0].target in MULTI_OUTPUT)


def output_dtypes(node: fx.Node) -> Sequence[torch.dtype]:
    val = node.meta["val"]
    return [v.dtype for v in val] if isinstance(val, (tuple, list)) else [val.dtype]
