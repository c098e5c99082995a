"""KIR: the instruction-level IR of one generated kernel (element-wise, or a row kernel).

A kernel is an SSA list of instructions over one iteration space (a shape of
`rank` dims): every value is one element per point of that space.  Loads read
an input (broadcast by stride 0, so one kernel serves any layout), stores
write an output (contiguous).

A row kernel (`reduce_dim` set) also reduces along one dim of that space:
`reduce.sum/max/min` turn a value into one element per row (per point of the
other dims), which later instructions use broadcast along the row again
(softmax: max, then exp(x - max), then sum, then divide); `scan.sum` gives
each element the sum of its row up to it (cumsum).  Its outputs are
full-space values or, for those listed in `reduced_outputs`, one value per
row (stored with the reduced dim kept as size 1).  Each instruction names the unit it runs on:
`vec` (the vector ALU), `sfu` (the special-function unit), `mem` (loads and
stores) or `imm` (an immediate constant; no instruction at run time).  Math
instructions carry the form the accuracy policy chose: `approx` (the unit's
fast hardware approximation) or `precise` (a correctly rounded or near-ulp
software sequence).

The listing is what the CLI shows; `to_json`/`from_json` are how a kernel
travels to the disk cache, keyed by a hash of its canonical text.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, FrozenSet, List, Optional, Tuple

import torch

DTYPE_NAMES = {
    torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "b1",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)

# Instruction set: op -> number of value operands.
VECTOR_OPS = {
    "add": 2, "sub": 2, "mul": 2, "fma": 3, "div": 2, "neg": 1, "abs": 1, "min": 2, "max": 2,
    "eq": 2, "ne": 2, "lt": 2, "le": 2, "gt": 2, "ge": 2, "select": 3, "and": 2, "or": 2, "xor": 2,
    "not": 1, "cast": 1, "idiv": 2,  # idiv: integer division truncating toward zero (C's)
}
# Math functions: on the SFU where the target has them, else software sequences on the vector ALU.
MATH_OPS = {
    "exp2": 1, "log2": 1, "rsqrt": 1, "sqrt": 1, "rcp": 1, "sin": 1, "cos": 1, "tanh": 1, "erf": 1,
    # precise-only functions (no single-instruction hardware form on the targets described)
    "exp": 1, "log": 1, "expm1": 1, "log1p": 1, "pow": 2,
}
# store.at (value, ids): writes the value at the point with its first coordinate replaced by the id (a
# negative id counts from the end; one outside the output writes nothing): eager's `out[ids] = values`.
MEMORY_OPS = {"load": 0, "store": 1, "store.at": 2}
# Indexed access (lowering/index_expr.py): `load.at` reads an input at index expressions of the
# kernel's coordinates (and of gathered ids: its operands); `iota` is such an expression's value.
# Their attr is a JSON string; their operands are the SSA values the expressions read.
INDEXED_OPS = ("load.at", "iota")
# Reductions along the row kernel's reduce_dim (vector unit: a tree of its add/max/min).  max/min propagate
# NaN as eager does; `reduce.maxnum` ignores it, for a max whose NaN reaches the result another way
# (softmax's x - max: a NaN in x makes the row NaN through exp and the sum).
REDUCE_OPS = {"reduce.sum": 1, "reduce.max": 1, "reduce.min": 1, "reduce.maxnum": 1}
# A row kernel's position along its row (i64): argmax is the least position holding the max.  row.length:
# the reduced dim's size, at run time; row.point: the row's own position, its kept dims flattened (a
# histogram's bin: a row per bin).
ROW_OPS = {"row.index": 0, "row.length": 0, "row.point": 0}
# Inclusive prefix sums along the row (cumsum): a value per element, each the sum of the row up to it.
SCAN_OPS = {"scan.sum": 1}
ARITY = {**VECTOR_OPS, **MATH_OPS, **MEMORY_OPS, **REDUCE_OPS, **ROW_OPS, **SCAN_OPS, "const": 0}
UNITS = ("vec", "sfu", "mem", "imm")


@dataclasses.dataclass(frozen=True)
class Instr:
    op: str
    dtype: torch.dtype  # the result's dtype (for store: the output's)
    args: Tuple[int, ...] = ()  # SSA ids of operand instructions
    attr: Any = None  # load/store: operand index; const: the value
    unit: str = "vec"
    form: str = ""  # math ops: "approx" | "precise"

    def __post_init__(self):
        if self.op in INDEXED_OPS:
            if not isinstance(self.attr, str):
                raise ValueError(f"KIR: {self.op} takes its index expressions as a JSON string")
        elif ARITY.get(self.op) != len(self.args):
            raise ValueError(f"KIR: {self.op} takes {ARITY.get(self.op)} operands, got {len(self.args)}")
        if self.unit not in UNITS:
            raise ValueError(f"KIR: unknown unit {self.unit!r}")


@dataclasses.dataclass(frozen=True)
class KernelIR:
    rank: int  # of the iteration space
    inputs: Tuple[torch.dtype, ...]
    outputs: Tuple[torch.dtype, ...]
    instrs: Tuple[Instr, ...]
    # what was lowered, for the listing: "silu, mul" (not part of the key)
    origin: str = dataclasses.field(default="", compare=False)
    reduce_dim: Optional[int] = None  # row kernels: the dim of the iteration space that is reduced
    reduced_outputs: Tuple[int, ...] = ()  # row kernels: outputs holding one value per row
    # kernels whose outputs keep an input's layout (eager's `x.t() * y`): each output's dims from outermost
    # to innermost in memory; empty when every output is contiguous (a row kernel's per-row outputs always are)
    output_orders: Tuple[Tuple[int, ...], ...] = ()

    def __post_init__(self):
        reduces = any(i.op in REDUCE_OPS or i.op in ROW_OPS or i.op in SCAN_OPS for i in self.instrs)
        if reduces != (self.reduce_dim is not None):
            raise ValueError("KIR: reduce instructions need a reduce_dim, and a reduce_dim needs them")
        if self.reduce_dim is not None and not 0 <= self.reduce_dim < self.rank:
            raise ValueError(f"KIR: reduce_dim {self.reduce_dim} outside rank {self.rank}")
        if self.output_orders and (len(self.output_orders) != len(self.outputs)
                                   or any(sorted(o) != list(range(self.rank)) for o in self.output_orders)
                                   or any(list(self.output_orders[k]) != list(range(self.rank))
                                          for k in self.reduced_outputs)):
            raise ValueError("KIR: output_orders must give each output a permutation (per-row outputs: none)")

    # ---- identity --------------------------------------------------------------------------
    def canonical(self) -> str:
        return json.dumps(self.to_json(with_origin=False), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.canonical().encode()).hexdigest()[:16]
        return ("pw_" if self.reduce_dim is None else "row_") + digest

    # ---- counts ----------------------------------------------------------------------------
    def count(self, unit: str) -> int:
        return sum(1 for i in self.instrs if i.unit == unit)

    # ---- facts the launcher and the op ask at every call: computed once per kernel ----------
    @functools.cached_property
    def indexed(self) -> bool:
        """Reads at index expressions or writes a permuted layout: the launcher keeps every dim (no
        coalescing), the kernel computes every coordinate."""
        return bool(self.output_orders) or any(i.op in INDEXED_OPS or i.op == "store.at" for i in self.instrs)

    @functools.cached_property
    def plain_inputs(self) -> FrozenSet[int]:
        """Inputs read by a plain load (broadcast to the iteration space); the others are read at index
        expressions or not at all (a device anchor)."""
        return frozenset(i.attr for i in self.instrs if i.op == "load")

    @functools.cached_property
    def host_checked_ids(self) -> Tuple[List[Tuple[int, int, int, bool]], List[Tuple[int, int, bool, int]]]:
        """(gathered_inputs, scattered_inputs): the ids the op range-checks on the host before a launch."""
        return gathered_inputs(self), scattered_inputs(self)

    def indexed_inputs(self) -> List[int]:
        return sorted({json.loads(i.attr)["in"] for i in self.instrs if i.op == "load.at"})

    @property
    def stores(self) -> List[Instr]:
        return [i for i in self.instrs if i.op == "store"]

    # ---- text ------------------------------------------------------------------------------
    def listing(self, target=None) -> str:
        ins = ", ".join(f"in{k} {DTYPE_NAMES[d]}" for k, d in enumerate(self.inputs))
        outs = ", ".join(f"out{k} {DTYPE_NAMES[d]}" + (" per row" if k in self.reduced_outputs else "")
                         + (f" dims {list(self.output_orders[k])} in memory" if self.output_orders
                            and list(self.output_orders[k]) != sorted(self.output_orders[k]) else "")
                         for k, d in enumerate(self.outputs))
        head = f"kernel {self.key}  rank {self.rank}  ({ins}) -> ({outs})"
        if self.reduce_dim is not None:
            head += f"  reduces dim {self.reduce_dim}"
        if self.origin:
            head += f"\n  ; lowered from: {self.origin}"
        lines = [head]
        for n, i in enumerate(self.instrs):
            lines.append("  " + format_instr(n, i))
        summary = (f"  ; {self.count('vec')} vec, {self.count('sfu')} sfu, {self.count('mem')} mem")
        if target is not None:
            summary += f"; est. {target.cycles_per_element(self):.4f} cycles/element/core on {target.name}"
        lines.append(summary)
        return "\n".join(lines)

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self, with_origin: bool = True) -> dict:
        d = {
            "rank": self.rank,
            "inputs": [DTYPE_NAMES[x] for x in self.inputs],
            "outputs": [DTYPE_NAMES[x] for x in self.outputs],
            "instrs": [[i.op, DTYPE_NAMES[i.dtype], list(i.args), _attr_to_json(i.attr), i.unit, i.form]
                       for i in self.instrs],
        }
        if self.reduce_dim is not None:  # absent for element-wise kernels: their keys stay as they were
            d["reduce_dim"] = self.reduce_dim
            d["reduced_outputs"] = list(self.reduced_outputs)
        if self.output_orders:
            d["output_orders"] = [list(o) for o in self.output_orders]
        if with_origin:
            d["origin"] = self.origin
        return d

    @classmethod
    def from_json(cls, d: dict) -> "KernelIR":
        instrs = tuple(Instr(op, DTYPES_BY_NAME[dt], tuple(args), _attr_from_json(attr), unit, form)
                       for op, dt, args, attr, unit, form in d["instrs"])
        return cls(d["rank"], tuple(DTYPES_BY_NAME[x] for x in d["inputs"]),
                   tuple(DTYPES_BY_NAME[x] for x in d["outputs"]), instrs, d.get("origin", ""),
                   d.get("reduce_dim"), tuple(d.get("reduced_outputs", ())),
                   tuple(tuple(o) for o in d.get("output_orders", ())))


def format_instr(n: int, i: Instr) -> str:
    if i.op == "load":
        body = f"load in{i.attr}"
    elif i.op == "store":
        return " " * 7 + f"{f'store out{i.attr}, %{i.args[0]}':<32} : {DTYPE_NAMES[i.dtype]:<4} mem"
    elif i.op == "store.at":
        return " " * 7 + f"{f'store out{i.attr}[%{i.args[1]}, ...], %{i.args[0]}':<32} : {DTYPE_NAMES[i.dtype]:<4} mem"
    elif i.op == "const":
        body = f"const {format_const(i.attr)}"
    elif i.op == "load.at":
        body = describe_indexed_load(i.attr)
    elif i.op == "iota":
        body = f"iota {describe_expr(json.loads(i.attr))}"
    elif i.op in REDUCE_OPS or i.op in SCAN_OPS:
        body = f"{i.op} %{i.args[0]}  ; along the row"
    else:
        name = f"{i.op}.{i.form}" if i.form else i.op
        body = f"{name} " + ", ".join(f"%{a}" for a in i.args)
    return f"%{n:<3} = {body:<32} : {DTYPE_NAMES[i.dtype]:<4} {i.unit}"


def gathered_inputs(kir: "KernelIR") -> List[Tuple[int, int, int, bool]]:
    """(ids input, table input, table dim, negative ids count from the end) for each gather whose ids are a
    kernel input read as they are (a load, perhaps cast): the ids a host check can see before the launch."""
    from .index_expr import Affine

    source = _input_sources(kir)
    out = []
    for i in kir.instrs:
        if i.op == "load.at":
            a = json.loads(i.attr)
            for j in a["bounds"]:
                e = Affine.from_json(a["index"][j])
                if e.const == 0 and len(e.terms) == 1 and e.terms[0][1] == 1 and e.terms[0][0].kind == "v" \
                        and e.terms[0][0].n in source:
                    out.append((source[e.terms[0][0].n], a["in"], j, j in a.get("wrap", ())))
    return sorted(set(out))


def _input_sources(kir: "KernelIR") -> dict:
    """SSA id -> the input it is, unchanged: a load, an integer cast of one, or a load.at that reads the
    input at coordinates only (ids [T] in a [T, H] kernel, under a `cat` branch's guard, shifted by a view
    of the gathered rows).  The graph's gather read every id of that input, so every id is checked."""
    from .index_expr import Affine

    source: dict = {}
    for n, i in enumerate(kir.instrs):
        if i.op == "load":
            source[n] = i.attr
        elif i.op == "cast" and i.args[0] in source and not i.dtype.is_floating_point:
            source[n] = source[i.args[0]]
        elif i.op == "load.at":
            a = json.loads(i.attr)
            if not a["bounds"] and not any(Affine.from_json(e).values() for e in a["index"]):
                source[n] = a["in"]
    return source


def scattered_inputs(kir: "KernelIR") -> List[Tuple[int, int, bool, int]]:
    """(ids input, kernel dim, negative ids count from the end, size) for each scatter whose ids are read from
    an input: positions along that dim of the kernel (size -1), or below a static size where the scatter's dim
    is not one dim of the kernel (a scatter read through a reshape); the ids a store.at writes at: dim 0."""
    out = {(a["in"], a["ids_of"], False, -1) if isinstance(a["ids_of"], int) else (a["in"], -1, False,
                                                                                     a["ids_of"]["size"])
           for a in (json.loads(i.attr) for i in kir.instrs if i.op == "load.at") if "ids_of" in a}
    source = _input_sources(kir)
    out |= {(source[i.args[1]], 0, True, -1) for i in kir.instrs if i.op == "store.at" and i.args[1] in source}
    return sorted(out)


def describe_expr(d: list) -> str:
    from .index_expr import Affine  # index_expr has no imports of its own from here: no cycle at import

    return Affine.from_json(d).code()


def describe_indexed_load(attr: str) -> str:
    a = json.loads(attr)
    text = f"load in{a['in']}[" + ", ".join(describe_expr(e) for e in a["index"]) + "]"
    for e, lo, hi in a["guard"]:
        text += f" if {lo} <= {describe_expr(e)}" + (f" < {hi}" if hi is not None else "")
    if a["bounds"]:
        text += " (gather: NaN outside)"
    return text


def format_const(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    return repr(v)


def _attr_to_json(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": format_const(v)}
    return v


def _attr_from_json(v: Any) -> Any:
    if isinstance(v, dict):
        return float(v["float"])
    return v


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes a result of `dtype` in: fp32 for half types."""
    return torch.float32 if dtype in HALF_DTYPES else dtype
