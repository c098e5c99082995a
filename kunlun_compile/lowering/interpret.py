"""The KIR interpreter in plain torch: the reference the generated kernels are tested against.

Every instruction is one torch op on whole tensors in the instruction's dtype,
so an instruction list evaluates exactly as written (one rounding per
instruction).  Approximate math forms evaluate as their precise functions: the
interpreter defines what the kernel computes, the approximation's error is
measured separately (benchmarks/sfu_ulp.py).  A row kernel's reductions are
torch's own (sum / amax / amin over the dim, kept as size 1): the same values
up to the order of the additions, NaN propagated as eager does.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Dict, List, Sequence

import torch

from .index_expr import Affine
from .kir import KernelIR

_BINARY: Dict[str, Callable] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "min": torch.minimum, "max": torch.maximum,
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor, "pow": torch.pow,
}
_UNARY: Dict[str, Callable] = {
    "neg": torch.neg, "abs": torch.abs, "not": torch.logical_not,
    "exp2": torch.exp2, "log2": torch.log2, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "rcp": torch.reciprocal,
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "erf": torch.erf, "exp": torch.exp, "log": torch.log,
    "expm1": torch.expm1, "log1p": torch.log1p,
}


_REDUCE: Dict[str, Callable] = {
    "reduce.sum": torch.sum, "reduce.max": torch.amax, "reduce.min": torch.amin,
    "reduce.maxnum": lambda x, dim, keepdim: _maxnum(x, dim),
}


def _maxnum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max ignoring NaN; over an empty row -inf (softmax of nothing is nothing; amax's own error is reduce.max's)."""
    if x.shape[dim] == 0:
        return torch.full([1 if d == dim else s for d, s in enumerate(x.shape)], float("-inf"), dtype=x.dtype,
                          device=x.device)
    return torch.amax(torch.where(x.isnan(), float("-inf"), x), dim, keepdim=True)


def output_shapes(kir: KernelIR, shape: Sequence[int]) -> List[tuple]:
    """Each output's shape: the iteration space, or for a row kernel's per-row outputs that space with the
    reduced dim kept as size 1."""
    per_row = tuple(1 if d == kir.reduce_dim else s for d, s in enumerate(shape))
    return [per_row if k in kir.reduced_outputs else tuple(shape) for k in range(len(kir.outputs))]


def _affine(e: Affine, coords: Sequence[torch.Tensor], vals: List[torch.Tensor]) -> torch.Tensor:
    out = torch.full(coords[0].shape if coords else (), e.const, dtype=torch.int64, device=coords[0].device)
    for atom, c in e.terms:
        if atom.kind == "c":
            x = coords[atom.n]
        elif atom.kind == "v":
            x = vals[atom.n].long()
        elif atom.kind == "//":
            x = torch.div(_affine(atom.inner, coords, vals), atom.n, rounding_mode="floor")
        else:
            x = torch.remainder(_affine(atom.inner, coords, vals), atom.n)
        out = out + c * x
    return out


def _load_at(attr: str, dtype: torch.dtype, x: torch.Tensor, coords, vals) -> torch.Tensor:
    """x read at the load's index expressions, under its guards; a gathered index outside x reads NaN."""
    a = json.loads(attr)
    index = [_affine(Affine.from_json(e), coords, vals) for e in a["index"]]
    for j in a.get("wrap", ()):  # x[ids]: a negative id counts from the end of the dim
        index[j] = torch.where(index[j] < 0, index[j] + x.shape[j], index[j])
    ok = torch.ones(coords[0].shape, dtype=torch.bool, device=x.device)
    for e, lo, hi in a["guard"]:
        g = _affine(Affine.from_json(e), coords, vals)
        ok &= (g >= lo) & (g < hi) if hi is not None else g >= lo
    for j in a["bounds"]:
        ok &= (index[j] >= 0) & (index[j] < x.shape[j])
    safe = [torch.where(ok, i, 0).clamp(0, max(x.shape[j] - 1, 0)) for j, i in enumerate(index)]
    v = x[tuple(safe)] if safe else x.expand(ok.shape)
    other = float("nan") if a["bounds"] and dtype.is_floating_point else 0
    return torch.where(ok, v, torch.tensor(other, dtype=dtype, device=x.device))


def allocate_outputs(kir: KernelIR, shape: Sequence[int], device) -> List[torch.Tensor]:
    """The kernel's outputs: contiguous, or in the layout `output_orders` gives (dims outermost first)."""
    outs = []
    for k, (s, dt) in enumerate(zip(output_shapes(kir, shape), kir.outputs)):
        if kir.output_orders:
            order = kir.output_orders[k]
            t = torch.empty([s[d] for d in order], dtype=dt, device=device)
            outs.append(t.permute([order.index(d) for d in range(len(order))]))
        else:
            outs.append(torch.empty(s, dtype=dt, device=device))
    return outs


def run_kir(kir: KernelIR, inputs: Sequence[torch.Tensor], shape: Sequence[int]) -> List[torch.Tensor]:
    device = inputs[0].device if inputs else torch.device("cpu")
    vals: List[torch.Tensor] = []
    coords = list(torch.meshgrid(*[torch.arange(s, device=device) for s in shape], indexing="ij")) \
        if kir.indexed else []
    outs = allocate_outputs(kir, shape, device)
    for ins in kir.instrs:
        a = [vals[i] for i in ins.args]
        if ins.op == "load":
            v = inputs[ins.attr].expand(tuple(shape))
        elif ins.op == "load.at":
            v = _load_at(ins.attr, ins.dtype, inputs[json.loads(ins.attr)["in"]], coords, vals)
        elif ins.op == "iota":
            v = _affine(Affine.from_json(json.loads(ins.attr)), coords, vals)
        elif ins.op == "store":
            if ins.attr in kir.reduced_outputs:  # one value per row: constant along the reduced dim
                d = kir.reduce_dim
                v = a[0].narrow(d, 0, 1) if a[0].dim() > d and a[0].shape[d] > 1 else a[0]
                outs[ins.attr].copy_(v.expand(outs[ins.attr].shape))
            else:
                outs[ins.attr].copy_(a[0].expand(tuple(shape)))
            v = a[0]
        elif ins.op == "store.at":  # out[ids, c1, ..] = value; a negative id from the end, one outside: nothing
            value, ids = (x.expand(tuple(shape)) for x in a)
            at = torch.where(ids < 0, ids + shape[0], ids)
            ok = (at >= 0) & (at < shape[0])
            outs[ins.attr].index_put_((at[ok],) + tuple(c[ok] for c in coords[1:]), value[ok].to(ins.dtype))
            v = a[0]
        elif ins.op == "row.length":
            v = torch.tensor(shape[kir.reduce_dim], dtype=torch.int64, device=device)
        elif ins.op == "row.point":
            kept = [1 if k == kir.reduce_dim else s for k, s in enumerate(shape)]
            v = torch.arange(math.prod(kept), device=device).view(kept)
        elif ins.op == "row.index":
            d = kir.reduce_dim
            v = torch.arange(shape[d], device=device).view([-1 if k == d else 1 for k in range(len(shape))])
        elif ins.op == "scan.sum":
            v = torch.cumsum(a[0].expand(tuple(shape)), dim=kir.reduce_dim, dtype=ins.dtype)
        elif ins.op in _REDUCE:
            v = _REDUCE[ins.op](a[0].expand(tuple(shape)), dim=kir.reduce_dim, keepdim=True)
        elif ins.op == "const":
            v = torch.tensor(ins.attr, dtype=ins.dtype, device=device)
        elif ins.op == "cast":
            v = a[0].to(ins.dtype)
        elif ins.op == "select":
            v = torch.where(a[0], a[1], a[2])
        elif ins.op == "fma":
            v = (a[0].double() * a[1].double() + a[2].double()).to(ins.dtype) if ins.dtype != torch.float64 \
                else torch.addcmul(a[2], a[0], a[1])
        elif ins.op == "div":
            v = torch.div(a[0], a[1])
        elif ins.op == "idiv":
            v = torch.div(a[0], a[1], rounding_mode="trunc")
        elif ins.op in _BINARY:
            v = _BINARY[ins.op](a[0], a[1])
        elif ins.op in _UNARY:
            v = _UNARY[ins.op](a[0])
        else:
            raise NotImplementedError(f"KIR interpreter: no rule for {ins.op}")
        if v.dtype != ins.dtype:
            raise AssertionError(f"KIR interpreter: {ins.op} gave {v.dtype}, instruction says {ins.dtype}")
        vals.append(v)
    return outs
