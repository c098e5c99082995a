"""Target descriptions: what each device's vector ALU and special-function unit do.

Instruction selection asks a target which math functions its SFU has (an op
the SFU lacks is lowered as a software sequence on the vector ALU) and the
CLI asks it for an estimated cost per element.  Costs are issue slots per
element per core (an SM on CUDA, a cluster core on Kunlun): a vector
instruction costs 1/vector_lanes cycles, an SFU instruction 1/sfu_lanes; a
precise software form costs the vector and SFU instructions of its sequence.

The CUDA numbers are the H100 SM's issue rates (128 fp32 lanes, 16 SFU lanes
per clock) and instruction counts of the libdevice sequences, counted
approximately; the Kunlun numbers are assumed from the public description
(element-wise work on the cluster's SIMD units, exp/log/sin/cos on a
high-precision SFU), not measured.  Both are estimates for comparing kernels,
not predictions of time.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, Mapping, Tuple

from ..config import TARGET_NAMES
from .kir import KernelIR

# Math ops that have a single hardware instruction on some SFU.
SFU_CAPABLE = frozenset({"exp2", "log2", "rsqrt", "sqrt", "rcp", "sin", "cos", "tanh", "erf"})


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    vector_lanes: int  # fp32 element operations per clock per core
    sfu_lanes: int  # SFU results per clock per core
    sfu_ops: FrozenSet[str]  # math ops with a hardware approximation on the SFU
    precise_sfu: bool  # True: the SFU's own results meet the precise policy (no software sequence needed)
    # precise software form of each math op: (vector instructions, SFU instructions)
    precise_cost: Mapping[str, Tuple[int, int]]
    has_inline_asm: bool  # codegen may emit the SFU instructions directly
    # row-kernel and indexing instructions, in vector issue slots per element: a reduction's tree and
    # cross-lane steps, an indexed load's address arithmetic, integer division's software sequence
    op_slots: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def unit(self, op: str, form: str) -> str:
        """Where a math op in the given form runs on this target."""
        if op in self.sfu_ops and (form == "approx" or self.precise_sfu):
            return "sfu"
        return "vec"

    def instr_cost(self, op: str, unit: str, form: str) -> float:
        if unit == "imm":
            return 0.0
        if op in self.op_slots:
            return self.op_slots[op] / self.vector_lanes
        if unit == "sfu":
            return 1.0 / self.sfu_lanes
        if form == "precise" and op in self.precise_cost:
            vec, sfu = self.precise_cost[op]
            return vec / self.vector_lanes + sfu / self.sfu_lanes
        if unit == "mem":
            return 1.0 / self.vector_lanes  # address arithmetic and issue only; bandwidth is not modelled
        return 1.0 / self.vector_lanes

    def cycles_per_element(self, kir: KernelIR) -> float:
        return sum(self.instr_cost(i.op, i.unit, i.form) for i in kir.instrs)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sfu_ops"] = sorted(self.sfu_ops)
        d["precise_cost"] = {k: list(v) for k, v in self.precise_cost.items()}
        d["op_slots"] = dict(self.op_slots)
        return d


_CUDA_PRECISE: Dict[str, Tuple[int, int]] = {
    # libdevice sequences: range reduction + polynomial (+ one SFU approximation where it uses one)
    "exp": (8, 1), "exp2": (3, 1), "log": (10, 1), "log2": (8, 1), "rsqrt": (4, 1), "sqrt": (6, 1),
    "rcp": (6, 1), "sin": (20, 0), "cos": (20, 0), "tanh": (14, 1), "erf": (14, 0), "expm1": (16, 1),
    "log1p": (16, 1), "pow": (30, 2), "div": (8, 1),
}

TARGETS: Dict[str, Target] = {
    "cuda": Target(
        name="cuda",
        description="NVIDIA Hopper SM: 128 fp32 lanes, 16 SFU lanes per clock; SFU: ex2/lg2/rsqrt/sqrt/rcp/"
                    "sin/cos/tanh .approx.f32 (inline PTX), precise forms from libdevice",
        vector_lanes=128, sfu_lanes=16,
        sfu_ops=frozenset({"exp2", "log2", "rsqrt", "sqrt", "rcp", "sin", "cos", "tanh"}),
        precise_sfu=False, precise_cost=_CUDA_PRECISE, has_inline_asm=True,
        # max/min also reduce a NaN flag; idiv: the ~20-instruction integer division sequence; scan: a scan
        # tree and its carry's sum
        op_slots={"reduce.sum": 1.5, "reduce.max": 3.0, "reduce.min": 3.0, "reduce.maxnum": 1.5, "row.index": 1.0,
                  "row.length": 0.0, "row.point": 0.0, "load.at": 2.0, "store.at": 2.0, "scan.sum": 3.0,
                  "iota": 1.0, "idiv": 20.0}),
    "kunlun-xpu": Target(
        name="kunlun-xpu",
        description="Kunlun XPU cluster core (assumed): 16-lane fp32 SIMD; high-precision SFU for "
                    "exp2/log2/rsqrt/sqrt/rcp/sin/cos/tanh/erf",
        vector_lanes=16, sfu_lanes=4, sfu_ops=SFU_CAPABLE, precise_sfu=True,
        precise_cost={"exp": (2, 1), "log": (2, 1), "expm1": (6, 1), "log1p": (6, 1), "pow": (4, 2),
                      "div": (2, 1)},
        has_inline_asm=False,
        # assumed: reductions cross the SIMD lanes in log steps; an indexed load computes its address per lane
        op_slots={"reduce.sum": 2.0, "reduce.max": 2.0, "reduce.min": 2.0, "reduce.maxnum": 2.0, "row.index": 1.0,
                  "row.length": 0.0, "row.point": 0.0, "load.at": 4.0, "store.at": 4.0, "scan.sum": 4.0,
                  "iota": 1.0, "idiv": 8.0}),
}
if tuple(TARGETS) != TARGET_NAMES:  # config.py checks the `target` option against its list of names
    raise ImportError(f"lowering/targets.py describes {tuple(TARGETS)}, config.TARGET_NAMES lists {TARGET_NAMES}")


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown lowering target {name!r}; targets are {sorted(TARGETS)}") from None
