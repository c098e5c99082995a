"""The KIR interpreter in plain torch: the reference the generated kernels are tested against.

Every instruction is one torch op on whole tensors in the instruction's dtype,
so an instruction list evaluates exactly as written (one rounding per
instruction).  Approximate math forms evaluate as their precise functions: the
interpreter defines what the kernel computes, the approximation's error is
measured separately (benchmarks/sfu_ulp.py).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

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


def run_kir(kir: KernelIR, inputs: Sequence[torch.Tensor], shape: Sequence[int]) -> List[torch.Tensor]:
    device = inputs[0].device if inputs else torch.device("cpu")
    vals: List[torch.Tensor] = []
    outs: List[torch.Tensor] = [torch.empty(tuple(shape), dtype=d, device=device) for d in kir.outputs]
    for ins in kir.instrs:
        a = [vals[i] for i in ins.args]
        if ins.op == "load":
            v = inputs[ins.attr].expand(tuple(shape))
        elif ins.op == "store":
            outs[ins.attr].copy_(a[0].expand(tuple(shape)))
            v = a[0]
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
