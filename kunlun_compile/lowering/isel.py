"""Instruction selection: ATen element-wise nodes -> KIR, under an accuracy policy.

Each lowered ATen op is one row of `LOWERINGS`: a function that builds the op
from KIR instructions, written in the order torch's own CUDA kernels evaluate
it (so that precise forms give eager's numbers, often bit for bit).  Values
carry the dtype eager's tensor would have: an op computes in its opmath type
(fp32 for bf16/fp16) and its result is rounded back to its dtype, as eager's
one-kernel-per-op execution rounds it.  With `fast_math` the roundings of
intermediate results are dropped.

Accuracy policy (per op, visible in the listing as `.approx` / `.precise`):
- fp64 is always precise.
- `fast_math`: every math function the target's SFU has runs in its approximate form.
- bf16/fp16 results: the SFU forms whose error is relative and far below the
  result's unit in the last place (exp2, rsqrt, sqrt, rcp, tanh; so also exp,
  sigmoid, silu) run approximate.  Forms with an absolute error bound (log2,
  sin, cos) and uses where cancellation would expose the error (tanh inside
  gelu's `1 + tanh`) stay precise.
- otherwise precise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .isel_index import SLICE_WRITES, is_index_op, why_not_indexable
from .refused import Refused
from .isel_reduce import (is_reduction, is_result_of_reduction, why_not_reducible)
from .kir import FLOAT_DTYPES, HALF_DTYPES, Instr, opmath
from .targets import Target

aten, prims = torch.ops.aten, torch.ops.prims
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
SQRT1_2 = 0.7071067811865476
GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5  # torch's kBeta
GELU_KAPPA = 0.044715
# SFU forms that keep a small relative error: hidden by a bf16/fp16 result.
APPROX_FOR_HALF = frozenset({"exp2", "rsqrt", "sqrt", "rcp", "tanh"})
SUPPORTED_DTYPES = (*FLOAT_DTYPES, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


@dataclasses.dataclass(frozen=True)
class Policy:
    fast_math: bool = False


@dataclasses.dataclass(frozen=True)
class Value:
    id: int
    dtype: torch.dtype


Operand = Any  # a Value or a Python scalar


class Builder:
    """Emits KIR with common-subexpression elimination; knows the policy for the op being lowered."""

    def __init__(self, target: Target, policy: Policy):
        self.target, self.policy = target, policy
        self.instrs: List[Instr] = []
        self._memo: Dict[tuple, Value] = {}
        self.result_dtype: torch.dtype = torch.float32  # of the ATen op being lowered
        self.in_cancellation = False  # inside an expression where approximate errors would show

    def emit(self, op: str, dtype: torch.dtype, args: Sequence[Value] = (), attr: Any = None, unit: str = "vec",
             form: str = "") -> Value:
        key = (op, dtype, tuple(a.id for a in args), _hashable(attr), unit, form)
        if op != "store" and key in self._memo:
            return self._memo[key]
        self.instrs.append(Instr(op, dtype, tuple(a.id for a in args), attr, unit, form))
        v = Value(len(self.instrs) - 1, dtype)
        self._memo[key] = v
        return v

    # ---- values --------------------------------------------------------------------------
    def load(self, index: int, dtype: torch.dtype) -> Value:
        return self.emit("load", dtype, (), index, "mem")

    def store(self, index: int, v: Value, dtype: torch.dtype) -> None:
        self.emit("store", dtype, (self.cast(v, dtype),), index, "mem")

    def const(self, value: Any, dtype: torch.dtype) -> Value:
        if dtype == torch.bool:
            value = bool(value)
        elif dtype.is_floating_point:
            value = float(value)
        else:
            if isinstance(value, float) and not value.is_integer():
                raise Refused(f"constant {value} does not fit {dtype}")
            value = int(value)
        return self.emit("const", dtype, (), value, "imm")

    def cast(self, v: Value, dtype: torch.dtype) -> Value:
        if v.dtype == dtype:
            return v
        if dtype == torch.bool:  # torch: nonzero is True (a compare, not a conversion)
            return self.emit("ne", torch.bool, (v, self.const(0, v.dtype)))
        return self.emit("cast", dtype, (v,))

    def operand(self, a: Operand, dtype: torch.dtype) -> Value:
        return self.cast(a, dtype) if isinstance(a, Value) else self.const(a, dtype)

    # ---- vector ops --------------------------------------------------------------------------
    def vec(self, op: str, *args: Value) -> Value:
        dtype = torch.bool if op in ("eq", "ne", "lt", "le", "gt", "ge") else args[-1].dtype
        return self.emit(op, dtype, args)

    def select(self, c: Value, a: Value, b: Value) -> Value:
        return self.emit("select", a.dtype, (c, a, b))

    # ---- math: the policy picks the form, the target the unit ---------------------------------
    def may_approx(self, op: str, dtype: torch.dtype) -> bool:
        if dtype != torch.float32 or op not in self.target.sfu_ops:
            return False
        if self.policy.fast_math:
            return True
        return (self.result_dtype in HALF_DTYPES and op in APPROX_FOR_HALF and not self.in_cancellation)

    def math(self, op: str, *args: Value, form: Optional[str] = None) -> Value:
        form = form or ("approx" if self.may_approx(op, args[0].dtype) else "precise")
        return self.emit(op, args[0].dtype, args, None, self.target.unit(op, form), form)

    def reduce(self, kind: str, v: Value) -> Value:
        """sum / max / min of `v` along the row kernel's reduced dim (one value per row)."""
        return self.emit(f"reduce.{kind}", v.dtype, (v,))

    def div(self, a: Value, b: Value) -> Value:
        if self.policy.fast_math and a.dtype == torch.float32 and "rcp" in self.target.sfu_ops:
            return self.vec("mul", a, self.math("rcp", b, form="approx"))
        return self.vec("div", a, b)

    def exp(self, x: Value) -> Value:
        if self.may_approx("exp2", x.dtype):
            return self.math("exp2", self.vec("mul", x, self.const(LOG2E, x.dtype)), form="approx")
        return self.math("exp", x, form="precise")

    def log(self, x: Value) -> Value:
        if self.may_approx("log2", x.dtype):
            return self.vec("mul", self.math("log2", x, form="approx"), self.const(LN2, x.dtype))
        return self.math("log", x, form="precise")

    def reciprocal(self, x: Value) -> Value:
        if self.may_approx("rcp", x.dtype):
            return self.math("rcp", x, form="approx")
        return self.vec("div", self.const(1.0, x.dtype), x)


def _hashable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


# ---- the lowering table -------------------------------------------------------------------------
# rule(builder, args, kwargs, out_dtype) -> Value in the op's compute dtype (opmath of out_dtype).

def _arg(args: Sequence[Any], kwargs: Dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _in_compute_dtype(b: Builder, args, out: torch.dtype) -> List[Value]:
    if out == torch.bool:
        raise Refused("arithmetic with a bool result")
    comp = opmath(out)
    return [b.operand(a, comp) for a in args]


def _unary_math(fn: Callable[[Builder, Value], Value]):
    def rule(b, args, kwargs, out):
        if not out.is_floating_point:
            raise Refused("floating-point function with a non-float result")
        (x,) = _in_compute_dtype(b, args[:1], out)
        return fn(b, x)
    return rule


def _add_sub(op: str, reverse: bool = False):
    """add/sub: self op alpha*other; rsub: other - alpha*self."""
    def rule(b, args, kwargs, out):
        x, y = _in_compute_dtype(b, args[:2], out)
        if reverse:
            x, y = y, x
        alpha = _arg(args, kwargs, 2, "alpha", 1)
        if alpha != 1:
            y = b.vec("mul", y, b.const(alpha, y.dtype))
        return b.vec(op, x, y)
    return rule


def _binary(op: str):
    def rule(b, args, kwargs, out):
        x, y = _in_compute_dtype(b, args[:2], out)
        return b.vec(op, x, y)
    return rule


def _div(b, args, kwargs, out):
    mode = kwargs.get("rounding_mode")
    if mode == "floor" and not out.is_floating_point:
        return _floor_divide(b, args, kwargs, out)
    if mode is not None:
        raise Refused(f"div with rounding_mode={mode!r}")
    x, y = _in_compute_dtype(b, args[:2], out)
    return b.div(x, y)


def _floor_divide(b, args, kwargs, out):
    """Integer floor division (Python's, torch's): truncation then one step down where the signs differ
    and the division was inexact."""
    if out.is_floating_point:
        raise Refused("floor division / remainder of floats")
    x, y = (b.operand(a, out) for a in args[:2])
    q = b.emit("idiv", out, (x, y))
    inexact = b.vec("ne", b.vec("mul", q, y), x)
    signs_differ = b.vec("ne", b.vec("lt", x, b.const(0, out)), b.vec("lt", y, b.const(0, out)))
    return b.select(b.vec("and", inexact, signs_differ), b.vec("sub", q, b.const(1, out)), q)


def _remainder(b, args, kwargs, out):
    """Integer remainder with the divisor's sign (Python's, torch's): x - floor(x / y) * y."""
    x, y = (b.operand(a, out) for a in args[:2])
    return b.vec("sub", x, b.vec("mul", _floor_divide(b, args, kwargs, out), y))


class _Compare:
    """A comparison rule.  Compares in the operands' common dtype, as torch does: a Python scalar is first
    rounded to it (`bf16 > 0.3` compares with bf16(0.3)); two values of that dtype then compare exactly in
    opmath.  The only kind of rule told the operands' dtype (instruction selection checks the type)."""

    def __init__(self, op: str):
        self.op = op

    def __call__(self, b, args, kwargs, out, operand_dtype: torch.dtype = torch.float32):
        comp = opmath(operand_dtype)
        x, y = (b.cast(a, comp) if isinstance(a, Value) else b.const(_rounded(a, operand_dtype), comp)
                for a in args[:2])
        return b.vec(self.op, x, y)


def _rounded(value: Any, dtype: torch.dtype) -> Any:
    if dtype.is_floating_point and dtype != torch.float64:
        return torch.tensor(float(value), dtype=torch.float64).to(dtype).item()
    return value


def _logical(op: str):
    def rule(b, args, kwargs, out):
        vals = [b.operand(a, torch.bool) for a in args]
        return b.vec(op, *vals)
    return rule


def _bitwise(op: str):
    def rule(b, args, kwargs, out):
        if out != torch.bool:
            raise Refused("bitwise ops are lowered on bool only")
        return _logical(op)(b, args, kwargs, out)
    return rule


def _sigmoid(b: Builder, x: Value) -> Value:
    one = b.const(1.0, x.dtype)
    if b.may_approx("exp2", x.dtype) and b.may_approx("rcp", x.dtype):
        e = b.math("exp2", b.vec("mul", x, b.const(-LOG2E, x.dtype)), form="approx")
        return b.math("rcp", b.vec("add", one, e), form="approx")
    return b.vec("div", one, b.vec("add", one, b.math("exp", b.vec("neg", x), form="precise")))


def _silu(b: Builder, x: Value) -> Value:
    if b.may_approx("exp2", x.dtype) and b.may_approx("rcp", x.dtype):
        return b.vec("mul", x, _sigmoid(b, x))
    one = b.const(1.0, x.dtype)
    return b.vec("div", x, b.vec("add", one, b.math("exp", b.vec("neg", x), form="precise")))


def _gelu(b, args, kwargs, out):
    (x,) = _in_compute_dtype(b, args[:1], out)
    approximate = _arg(args, kwargs, 1, "approximate", "none")
    half, one = b.const(0.5, x.dtype), b.const(1.0, x.dtype)
    if approximate == "none":
        inner = b.math("erf", b.vec("mul", x, b.const(SQRT1_2, x.dtype)))
    elif approximate == "tanh":
        cube = b.vec("mul", b.vec("mul", x, x), x)
        arg = b.vec("mul", b.const(GELU_BETA, x.dtype),
                    b.vec("add", x, b.vec("mul", b.const(GELU_KAPPA, x.dtype), cube)))
        b.in_cancellation = True  # 1 + tanh(arg) cancels for arg << 0
        try:
            inner = b.math("tanh", arg)
        finally:
            b.in_cancellation = False
    else:
        raise Refused(f"gelu approximate={approximate!r}")
    return b.vec("mul", b.vec("mul", half, x), b.vec("add", one, inner))


def _pow(b, args, kwargs, out):
    base, e = args[0], args[1]
    if not out.is_floating_point:
        raise Refused("integer pow")
    if isinstance(e, Value):  # a tensor exponent: powf, as torch's tensor-tensor kernel
        x, ev = _in_compute_dtype(b, [base, e], out)
        return b.math("pow", x, ev, form="precise")
    (x,) = _in_compute_dtype(b, [base], out)
    one = b.const(1.0, x.dtype)
    if e == 0:
        return one
    if e == 1:
        return x
    if e == 2:
        return b.vec("mul", x, x)
    if e == 3:
        return b.vec("mul", b.vec("mul", x, x), x)
    if e == 0.5:
        return b.math("sqrt", x)
    if e == -0.5:
        return b.math("rsqrt", x)
    if e == -1:
        return b.reciprocal(x)
    if e == -2:
        return b.reciprocal(b.vec("mul", x, x))
    return b.math("pow", x, b.const(e, x.dtype), form="precise")


def _clamp(kind: str):
    def rule(b, args, kwargs, out):
        comp = opmath(out)
        x = b.operand(args[0], comp)
        lo = _arg(args, kwargs, 1, "min") if kind in ("both", "min") else None
        hi = (_arg(args, kwargs, 2, "max") if kind == "both" else _arg(args, kwargs, 1, "max")) \
            if kind in ("both", "max") else None
        if isinstance(lo, Value) or isinstance(hi, Value):
            return _clamp_by_tensors(b, x, lo, hi, comp)
        if lo is not None:
            x = b.vec("max", x, b.const(lo, comp))
        if hi is not None:  # applied last: torch gives max when min > max
            x = b.vec("min", x, b.const(hi, comp))
        return x
    return rule


def _clamp_by_tensors(b, x: Value, lo, hi, comp: torch.dtype) -> Value:
    """torch's clamp with tensor bounds: x where x >= min (or x is NaN) else min, then the same against max --
    a NaN bound makes the result NaN through the failed compare."""
    for bound, keep in ((lo, "ge"), (hi, "le")):
        if bound is not None:
            v = b.operand(bound, comp)
            x = b.select(b.vec("or", b.vec(keep, x, v), b.vec("ne", x, x)), x, v)
    return x


def _relu(b, args, kwargs, out):
    x = b.operand(args[0], opmath(out))
    return b.vec("max", x, b.const(0, x.dtype))


def _leaky_relu(b, args, kwargs, out):
    x = b.operand(args[0], opmath(out))
    slope = _arg(args, kwargs, 1, "negative_slope", 0.01)
    return b.select(b.vec("gt", x, b.const(0, x.dtype)), x, b.vec("mul", x, b.const(slope, x.dtype)))


def _where(b, args, kwargs, out):
    comp = opmath(out)
    c = b.operand(args[0], torch.bool)
    return b.select(c, b.operand(args[1], comp), b.operand(args[2], comp))


def _masked_fill(b, args, kwargs, out):
    comp = opmath(out)
    return b.select(b.operand(args[1], torch.bool), b.operand(args[2], comp), b.operand(args[0], comp))


def _convert(b, args, kwargs, out):
    x = args[0]
    if not isinstance(x, Value):
        return b.const(x, out)
    return b.cast(x, out)  # exact conversion to the target type: no opmath round trip


_HARMLESS_COPY_KWARGS = {
    "dtype": lambda v: True,
    "device": lambda v: True,  # same device: why_not_lowerable checks every operand's device
    "layout": lambda v: v in (None, torch.strided),
    "memory_format": lambda v: v in (None, torch.preserve_format, torch.contiguous_format),
    "non_blocking": lambda v: True,
    "pin_memory": lambda v: not v,
}


def _to_copy(b, args, kwargs, out):
    odd = [k for k, v in kwargs.items() if not _HARMLESS_COPY_KWARGS.get(k, lambda v: False)(v)]
    if odd:
        raise Refused(f"_to_copy with {odd}")
    return _convert(b, args[:1], {}, out)


def _identity(b, args, kwargs, out):
    return b.operand(args[0], opmath(out)) if isinstance(args[0], Value) else b.const(args[0], out)


def _fill(value_of: Callable[[tuple, dict], Any]):
    def rule(b, args, kwargs, out):
        return b.const(value_of(args, kwargs), opmath(out))
    rule.reads_values = False
    return rule


def _neg(b, args, kwargs, out):
    return b.vec("neg", b.operand(args[0], opmath(out)))


def _abs(b, args, kwargs, out):
    return b.vec("abs", b.operand(args[0], opmath(out)))


LOWERINGS: Dict[Any, Callable] = {
    aten.add: _add_sub("add"), aten.sub: _add_sub("sub"), aten.rsub: _add_sub("sub", reverse=True),
    aten.mul: _binary("mul"), aten.div: _div, aten.floor_divide: _floor_divide, aten.remainder: _remainder,
    aten.neg: _neg, aten.abs: _abs,
    aten.minimum: _binary("min"), aten.maximum: _binary("max"),
    aten.exp: _unary_math(lambda b, x: b.exp(x)),
    aten.exp2: _unary_math(lambda b, x: b.math("exp2", x)),
    aten.expm1: _unary_math(lambda b, x: b.math("expm1", x, form="precise")),
    aten.log: _unary_math(lambda b, x: b.log(x)),
    aten.log2: _unary_math(lambda b, x: b.math("log2", x)),
    aten.log1p: _unary_math(lambda b, x: b.math("log1p", x, form="precise")),
    aten.sqrt: _unary_math(lambda b, x: b.math("sqrt", x)),
    aten.rsqrt: _unary_math(lambda b, x: b.math("rsqrt", x)),
    aten.reciprocal: _unary_math(lambda b, x: b.reciprocal(x)),
    aten.sin: _unary_math(lambda b, x: b.math("sin", x)),
    aten.cos: _unary_math(lambda b, x: b.math("cos", x)),
    aten.tanh: _unary_math(lambda b, x: b.math("tanh", x)),
    aten.erf: _unary_math(lambda b, x: b.math("erf", x)),
    aten.sigmoid: _unary_math(_sigmoid), aten.silu: _unary_math(_silu), aten.gelu: _gelu,
    aten.pow: _pow, aten.relu: _relu, aten.leaky_relu: _leaky_relu,
    aten.clamp: _clamp("both"), aten.clamp_min: _clamp("min"), aten.clamp_max: _clamp("max"),
    aten.where: _where, aten.masked_fill: _masked_fill,
    aten.eq: _Compare("eq"), aten.ne: _Compare("ne"), aten.lt: _Compare("lt"), aten.le: _Compare("le"),
    aten.gt: _Compare("gt"), aten.ge: _Compare("ge"),
    aten.logical_and: _logical("and"), aten.logical_or: _logical("or"), aten.logical_xor: _logical("xor"),
    aten.logical_not: _logical("not"),
    aten.bitwise_and: _bitwise("and"), aten.bitwise_or: _bitwise("or"), aten.bitwise_xor: _bitwise("xor"),
    aten.bitwise_not: _bitwise("not"),
    prims.convert_element_type: _convert, aten._to_copy: _to_copy, aten.clone: _identity,
    aten.full_like: _fill(lambda a, k: k.get("fill_value", a[1] if len(a) > 1 else None)),
    aten.zeros_like: _fill(lambda a, k: 0), aten.ones_like: _fill(lambda a, k: 1),
    aten.fill: _fill(lambda a, k: a[1]), aten.full: _fill(lambda a, k: a[1]),
    aten.scalar_tensor: _fill(lambda a, k: a[0]),  # torch.where(c, 0.0, x) traces its scalar as one
    aten.zeros: _fill(lambda a, k: 0), aten.ones: _fill(lambda a, k: 1),
    aten.new_zeros: _fill(lambda a, k: 0), aten.new_ones: _fill(lambda a, k: 1),
    aten.new_full: _fill(lambda a, k: a[2]), aten.lift_fresh_copy: _identity,
    # an uninitialised buffer that slice writes fill (why_not_lowerable): any value is eager's, 0 is one
    aten.new_empty: _fill(lambda a, k: 0),
}
# Ops whose result is exactly representable in the result dtype (no rounding step).
_EXACT = {prims.convert_element_type, aten._to_copy, aten.clone, aten.where, aten.masked_fill, aten.neg, aten.abs,
          aten.minimum, aten.maximum, aten.clamp, aten.clamp_min, aten.clamp_max, aten.relu, aten.full_like,
          aten.zeros_like, aten.ones_like, aten.fill, aten.full, aten.scalar_tensor, aten.zeros, aten.ones,
          aten.new_zeros, aten.new_ones, aten.new_full, aten.lift_fresh_copy}


def packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


# Ops that expand to math functions (SFU or software sequences): never recomputed per broadcast element.
_MATH_PACKETS = {aten.exp, aten.exp2, aten.expm1, aten.log, aten.log2, aten.log1p, aten.sqrt, aten.rsqrt,
                 aten.reciprocal, aten.sin, aten.cos, aten.tanh, aten.erf, aten.sigmoid, aten.silu, aten.gelu,
                 aten.pow, aten.div}


def is_cheap(node: fx.Node) -> bool:
    """A few vector instructions: worth recomputing rather than storing and reloading."""
    return packet(node) not in _MATH_PACKETS


def _is_arange(node: fx.Node) -> bool:
    return node.target in (aten.arange.default, aten.arange.start, aten.arange.start_step)


def reads_values(node: fx.Node) -> bool:
    return getattr(LOWERINGS.get(packet(node)), "reads_values", True)


def why_not_lowerable(node: fx.Node) -> Optional[str]:
    """None if the node is an element-wise op or a reduction this lowering handles, else why not."""
    if is_result_of_reduction(node):
        return why_not_lowerable(node.args[0])
    if is_reduction(node):
        return why_not_reducible(node) or _why_not_values(node, node.meta.get("val"))
    if is_index_op(node):
        return why_not_indexable(node) or _why_not_operands(node, node.meta.get("val"))
    if node.op != "call_function" or packet(node) not in LOWERINGS:
        return "not an element-wise op in the lowering table"
    if packet(node) is aten.new_empty and not all(u.target in SLICE_WRITES and u.args[0] is node
                                                  or u.op == "call_function" and not u.users for u in node.users):
        return "an uninitialised buffer read other than under slice writes (an allocation, not a kernel)"
    return _why_not_values(node, node.meta.get("val"))


def _why_not_values(node: fx.Node, val: Any) -> Optional[str]:
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return next(filter(None, (_why_not_values(node, v) for v in val)), None)
    if not isinstance(val, torch.Tensor):
        return "no tensor result"
    if val.dtype not in SUPPORTED_DTYPES:
        return f"dtype {val.dtype}"
    if layout_order(val) is None or (not is_contiguous(val) and (is_reduction(node) or is_result_of_reduction(node))):
        return "result is not dense or of a layout the kernel can write (eager keeps an input's layout)"
    reason = _why_not_operands(node, val)
    if reason:
        return reason
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            return "a list of tensors as an operand"
    return None


def _why_not_operands(node: fx.Node, val: Any) -> Optional[str]:
    if not isinstance(val, torch.Tensor) or val.dtype not in SUPPORTED_DTYPES:
        return "no tensor result of a supported dtype"
    devices = {val.device}
    for a in node.all_input_nodes:
        av = a.meta.get("val")
        if isinstance(av, torch.Tensor):
            if av.dtype not in SUPPORTED_DTYPES:
                return f"input dtype {av.dtype}"
            if av.dim() > 0 or av.device == val.device:
                devices.add(av.device)
            elif av.device != val.device:
                return "a 0-dim operand on another device"
        elif not (isinstance(av, torch.SymInt) and _is_arange(node)):  # arange's end only sizes its result
            return "a symbolic or non-tensor operand"
    if len(devices) > 1:
        return "operands on several devices"
    return None


def layout_order(val: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """val's dims from outermost to innermost in memory when it is dense (a permuted contiguous tensor), else
    None.  Element-wise results keep their first input's layout in eager (`x.t() * y`); kernels write it."""
    if is_contiguous(val):
        return tuple(range(val.dim()))
    try:
        order = tuple(val.dim_order())
    except Exception:  # noqa: BLE001 - symbolic strides whose order cannot be decided
        return None
    return order if is_contiguous(val.permute(order)) else None


def is_contiguous(val: torch.Tensor) -> bool:
    expected = 1
    for size, stride in reversed(list(zip(val.shape, val.stride()))):
        s = size.node.expr if isinstance(size, torch.SymInt) else size
        st = stride.node.expr if isinstance(stride, torch.SymInt) else stride
        if s != 1 and st != expected:
            return False
        expected = expected * s
    return True


def lower_node(b: Builder, node: fx.Node, value_of: Callable, policy: Policy, is_output: bool) -> Value:
    """One element-wise node, its operands given by `value_of`; the result rounded to the node's dtype
    (kept in opmath under fast_math where nothing outside reads it)."""
    out = node.meta["val"].dtype
    rule = LOWERINGS[packet(node)]
    # a fill (full_like, full) takes a tensor or a size list for its shape only: nothing is read
    value_of_arg = value_of if reads_values(node) else (
        lambda a: None if isinstance(a, (fx.Node, list, tuple)) else value_of(a))
    args = [value_of_arg(a) for a in node.args]
    kwargs = {k: value_of_arg(v) for k, v in node.kwargs.items()}
    b.result_dtype = out
    if isinstance(rule, _Compare):
        operand_dtype = torch.result_type(*[_dummy(a) for a in node.args[:2]])
        v = rule(b, args, kwargs, out, operand_dtype=operand_dtype)
    else:
        v = rule(b, args, kwargs, out)
    keep_precision = policy.fast_math and not is_output and packet(node) not in _EXACT
    return v if keep_precision and v.dtype == opmath(out) else b.cast(v, out)


def scalar_operand(a: Any) -> Any:
    """A non-tensor operand as the rules take it; Refused for anything else."""
    if isinstance(a, (bool, int, float)):
        return a
    if a is None or isinstance(a, (str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return a
    raise Refused(f"operand {a!r} of type {type(a).__name__}")


def _dummy(a: Any) -> Any:
    if isinstance(a, fx.Node):
        v = a.meta["val"]
        return torch.empty((1,) * v.dim(), dtype=v.dtype, device="meta")
    return a
