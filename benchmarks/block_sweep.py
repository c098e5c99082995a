"""Launch configuration of the generated element-wise kernels, swept on the prefill rows of bench_lowering
where kunlun trails inductor (NOTES v23: the causal mask's kernel matches inductor's instruction for
instruction; inductor autotunes its block and warps per kernel, ours are fixed).  For each case: inductor's
time, then kunlun's with each (elements per program, warps), CUDA-graph replay medians; JSON to OUT_DIR.

    python benchmarks/block_sweep.py [OUT_DIR]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lowering as B  # noqa: E402
from bench_fusion import graph_time_ms  # noqa: E402

import kunlun_compile as kc  # noqa: E402
from kunlun_compile.lowering import cache  # noqa: E402

CASES = (("causal_mask", 4096), ("rotary_neox", 8192))
CONFIGS = ((1024, 4), (512, 4), (2048, 8), (4096, 8))


def main(out_dir: str) -> None:
    rows = []
    for name, tokens in CASES:
        fn, make = B.CASES[name]
        args = make(tokens, B.SIZES, "cuda")
        torch._dynamo.reset()
        row = {"case": name, "tokens": tokens, "inductor_ms": graph_time_ms(torch.compile(fn), args)}
        torch._dynamo.reset()
        compiled = kc.compile(fn, **B.KUNLUN_OPTIONS)
        want = compiled(*args)
        for block, warps in CONFIGS:
            cache.BLOCK, cache.NUM_WARPS = block, warps
            got = compiled(*args)
            same = all(torch.equal(a, b) for a, b in zip(B.outputs(got), B.outputs(want)))
            row[f"{block}x{warps}"] = graph_time_ms(compiled, args) if same else None
        cache.BLOCK, cache.NUM_WARPS = CONFIGS[0]
        rows.append(row)
        print(f"{name:<18}{tokens:>6} inductor {row['inductor_ms']:.4f} | " + " ".join(
            f"{b}x{w} {row[f'{b}x{w}'] / row['inductor_ms']:.2f}" for b, w in CONFIGS if row[f"{b}x{w}"]), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "block_sweep_h200.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
