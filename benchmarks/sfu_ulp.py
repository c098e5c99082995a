"""Max error in ULP of each SFU form (and the derived functions built on them), per dtype, vs float64.

Every form runs as a generated kernel (KIR -> Triton, inline PTX for the
approximate forms on CUDA): load x, compute in fp32, round to the dtype, store.
The error of each result is measured in units in the last place of the result
dtype, against the float64 function of the same input; eager torch's own op on
the same inputs is measured the same way, for scale.  Inputs: a dense sweep of
each function's domain (log-uniform over magnitudes where it spans decades).

    python benchmarks/sfu_ulp.py [OUT_DIR]   -> sfu_ulp_<device>.json and a markdown table on stdout
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import triton

from kunlun_compile.lowering.cache import kernel_for, register
from kunlun_compile.lowering.isel import Builder, Policy, _gelu, _sigmoid, _silu
from kunlun_compile.lowering.kir import KernelIR
from kunlun_compile.lowering.targets import get_target

PRECISION = {torch.float32: (24, -126), torch.bfloat16: (8, -126), torch.float16: (11, -14)}
N = 1 << 22 if torch.cuda.is_available() else 1 << 12  # the CPU run (interpreter) is a smoke test


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    p, emin = PRECISION[dtype]
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** emin))).clamp_min(emin)
    return torch.exp2(e - (p - 1))


def log_uniform(lo: float, hi: float, signed: bool = False) -> torch.Tensor:
    x = torch.exp(torch.empty(N, dtype=torch.float64).uniform_(math.log(lo), math.log(hi)))
    if signed:
        x = x * (torch.randint(0, 2, (N,), dtype=torch.float64) * 2 - 1)
    return x


def uniform(lo: float, hi: float) -> torch.Tensor:
    return torch.empty(N, dtype=torch.float64).uniform_(lo, hi)


def _build(body, form: str, dtype: torch.dtype) -> KernelIR:
    b = Builder(get_target("cuda"), Policy(fast_math=(form == "approx")))
    b.result_dtype = torch.float32  # the form is forced: fast_math for approx, the fp32 policy for precise
    x = b.cast(b.load(0, dtype), torch.float32)
    b.store(0, body(b, x, form), dtype)
    return KernelIR(1, (dtype,), (dtype,), tuple(b.instrs), f"ulp probe ({form})")


def sfu(op):
    return lambda b, x, form: b.math(op, x, form=form)


def rcp(b, x, form):
    return b.math("rcp", x, form="approx") if form == "approx" else b.reciprocal(x)


def exp(b, x, form):
    return b.exp(x)


def log(b, x, form):
    return b.log(x)


def via(rule):
    return lambda b, x, form: rule(b, x)


def gelu_tanh(b, x, form):
    return _gelu(b, [x], {"approximate": "tanh"}, torch.float32)


F = torch.nn.functional
# name -> (KIR body, float64 reference, eager op, inputs)
CASES = {
    "exp2": (sfu("exp2"), torch.exp2, torch.exp2, lambda: uniform(-60, 60)),
    "log2": (sfu("log2"), torch.log2, torch.log2, lambda: log_uniform(1e-30, 1e30)),
    "rsqrt": (sfu("rsqrt"), torch.rsqrt, torch.rsqrt, lambda: log_uniform(1e-30, 1e30)),
    "sqrt": (sfu("sqrt"), torch.sqrt, torch.sqrt, lambda: log_uniform(1e-30, 1e30)),
    "rcp": (rcp, torch.reciprocal, torch.reciprocal, lambda: log_uniform(1e-30, 1e30, signed=True)),
    "sin [-pi, pi]": (sfu("sin"), torch.sin, torch.sin, lambda: uniform(-math.pi, math.pi)),
    "cos [-pi, pi]": (sfu("cos"), torch.cos, torch.cos, lambda: uniform(-math.pi, math.pi)),
    "sin [-100, 100]": (sfu("sin"), torch.sin, torch.sin, lambda: uniform(-100, 100)),
    "tanh": (sfu("tanh"), torch.tanh, torch.tanh, lambda: uniform(-10, 10)),
    "exp (= exp2(x log2e))": (exp, torch.exp, torch.exp, lambda: uniform(-80, 80)),
    "log (= log2(x) ln2)": (log, torch.log, torch.log, lambda: log_uniform(1e-30, 1e30)),
    "sigmoid": (via(_sigmoid), torch.sigmoid, torch.sigmoid, lambda: uniform(-30, 30)),
    "silu": (via(_silu), F.silu, F.silu, lambda: uniform(-30, 30)),
    "gelu (tanh)": (gelu_tanh, lambda x: F.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh"),
                    lambda: uniform(-3, 3)),
}


def measure(got: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> dict:
    ok = torch.isfinite(ref64) & (ref64.abs() <= torch.finfo(dtype).max)
    err = (got.double() - ref64).abs()[ok] / ulp(ref64[ok], dtype)
    bad = (~torch.isfinite(got.double()[ok])).sum().item()
    return {"max_ulp": round(err.max().item(), 3), "mean_ulp": round(err.mean().item(), 4),
            "p99_ulp": round(torch.quantile(err[: 1 << 20].float(), 0.99).item(), 3) if err.numel() else 0.0,
            "nonfinite": bad}


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, (body, ref_fn, eager_fn, inputs) in CASES.items():
        x64 = inputs()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = x64.to(dtype)
            if dtype == torch.float16:
                x = x[torch.isfinite(x)]
            xd = x.to(dev)
            ref = ref_fn(x.double())
            row = {"function": name, "dtype": str(dtype).replace("torch.", ""),
                   "eager": measure(eager_fn(xd).cpu(), ref, dtype)}
            for form in ("precise", "approx"):
                kir = _build(body, form, dtype)
                got = kernel_for(register(kir))([xd], list(xd.shape))[0]
                row[form] = measure(got.cpu(), ref, dtype)
                row[form + "_forms"] = sorted({f"{i.op}.{i.form}" for i in kir.instrs if i.form})
            rows.append(row)
            print(f"{name:<24} {row['dtype']:<9} eager max {row['eager']['max_ulp']:>8}  precise max "
                  f"{row['precise']['max_ulp']:>8}  approx max {row['approx']['max_ulp']:>8}  "
                  f"(approx mean {row['approx']['mean_ulp']})", flush=True)
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__,
              "inputs_per_function": N, "rows": rows}
    path = os.path.join(out_dir, "sfu_ulp_h100.json" if "H100" in result["device"] else "sfu_ulp.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("\n| function | dtype | eager max | precise max | approx max | approx mean | approx forms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['function']} | {r['dtype']} | {r['eager']['max_ulp']} | {r['precise']['max_ulp']} | "
              f"{r['approx']['max_ulp']} | {r['approx']['mean_ulp']} | {', '.join(r['approx_forms'])} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
