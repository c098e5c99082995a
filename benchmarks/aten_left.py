"""What the generic lowering leaves as ATen kernels, with every fusion pass off (`--no-fusion`).

Compiles each built-in model and each HF corpus architecture named (tests/corpus/archs.py) with
fusion=False, runs it against eager, and lists the ATen ops that still launch a kernel, split into
the kinds the generic path is meant to keep (matmuls, attention, sort/top-k, grouped GEMMs,
collectives, random ops) and the rest, which it should have generated.

    python benchmarks/aten_left.py [OUT_JSON] [builtins|ARCH,ARCH,...|all] [fp32|bf16]
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# matmul-class library calls (cuBLAS / LAPACK: a triangular solve is BLAS-3 TRSM, Qwen3-Next's chunked delta
# rule), attention, sort/top-k, collectives and random ops: what the generic path keeps as ATen by design
KEPT = {"mm", "addmm", "bmm", "baddbmm", "linalg_solve_triangular", "topk", "sort", "argsort", "_grouped_mm",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention", "bernoulli",
        "rand", "randn", "randint", "multinomial", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"}


def aten_left(code: str) -> collections.Counter:
    """ATen ops in a graph's code that launch a kernel (views and size arithmetic do not)."""
    left = collections.Counter()
    for op, overload in re.findall(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)\(", code):
        target = getattr(getattr(torch.ops.aten, op), overload)
        # _unsafe_view is a view that is not marked as one (no kernel)
        if not target.is_view and not op.startswith("sym_") and op not in ("_assert_async", "_assert_scalar",
                                                                           "_unsafe_view"):
            left[f"{op}.{overload}"] += 1
    return left


def compile_and_collect(model, args) -> dict:
    import kunlun_compile as kc

    torch._dynamo.reset()
    be = kc.backend(fusion=False, graph_mode="none")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.compile(model, backend=be)(*args)
        want = model(*args)
    got = getattr(got, "logits", got)
    want = getattr(want, "logits", want)
    got, want = (got[0], want[0]) if isinstance(got, (tuple, list)) else (got, want)
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300))
    total = sum((aten_left(g.passes[-1].code_after) for g in be.report.graphs if g.passes), collections.Counter())
    return {"kept": {k: v for k, v in total.items() if k.split(".")[0] in KEPT},
            "left": {k: v for k, v in total.items() if k.split(".")[0] not in KEPT},
            "kernels": {k: sum(g.get(k, 0) for g in [gr.kernels for gr in be.report.graphs])
                        for k in ("fused", "pointwise", "aten")},
            "rel_err": err, "fallbacks": [f.reason for g in be.report.graphs for f in g.fallbacks]}


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else None
    which = sys.argv[2] if len(sys.argv) > 2 else "builtins"
    dname = sys.argv[3] if len(sys.argv) > 3 else "fp32"
    rows = {}
    if which in ("builtins", "all"):
        from kunlun_compile.models import build_model, builtin_names

        for name in builtin_names():
            model, inputs = build_model(name)
            rows[name] = compile_and_collect(model, inputs)
            print(name, rows[name]["kernels"], "left:", rows[name]["left"], f"err {rows[name]['rel_err']:.1e}",
                  flush=True)
    if which != "builtins":
        from tests.corpus.archs import ARCHS
        from tests.corpus.run import build, input_ids, TORCH_DTYPES

        names = None if which == "all" else set(which.split(","))
        for arch in ARCHS:
            if names is not None and arch.name not in names:
                continue
            try:
                row = compile_and_collect(build(arch, TORCH_DTYPES[dname]), (input_ids(arch.ids_seed),))
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows[f"hf-{arch.name}"] = row
            print(f"hf-{arch.name}", row.get("kernels"), "left:", row.get("left", row.get("error")),
                  f"err {row.get('rel_err', float('nan')):.1e}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"dtype": dname, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
