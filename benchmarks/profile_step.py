"""Where one decode step's time goes: the compiled step (full graph) profiled kernel by kernel.

Builds the runtime benchmark's 4-layer model (bench_runtime.SIZES, bf16), compiles it with the
full-graph runtime, and over 50 replays at T tokens records per kernel name the GPU time per step
and launches per step, next to the wall time of one call (do_bench) and the weight-read floor.
The gap between wall time and the sum of kernel times is host work and GPU idle between kernels.

    python benchmarks/profile_step.py OUT_DIR [MODEL] [TOKENS]   -> profile_step_<model>_T<T>.json
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

import kunlun_compile as kc
from bench_runtime import MODELS, SIZES, copy_gbps, weight_floor_ms
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs

REPS = 50


def main(out_dir: str, name: str = "qwen3-moe-tiny", tokens: int = 1) -> None:
    cfg_over = dict(SIZES, **MODELS[name])
    model, _ = build_model(name, dtype=torch.bfloat16, device="cuda", **cfg_over)
    cfg = dataclasses.replace(BUILTIN_CONFIGS[name], **cfg_over)
    ids, pos = make_inputs(cfg, tokens, device="cuda")
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="full", capture_sizes=[tokens])
    with torch.no_grad():
        for _ in range(3):
            compiled(ids, pos)
        torch.cuda.synchronize()
        wall = do_bench(lambda: compiled(ids, pos), warmup=10, rep=200, return_mode="median")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(REPS):
                compiled(ids, pos)
            torch.cuda.synchronize()
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name[:90]][0] += 1
            per_name[e.name[:90]][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(({"kernel": k, "launches_per_step": n / REPS, "us_per_step": t / REPS}
                   for k, (n, t) in per_name.items()), key=lambda r: -r["us_per_step"])
    gpu_us = sum(r["us_per_step"] for r in rows)
    floor = weight_floor_ms(model, cfg, tokens, copy_gbps())
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "model": name, "tokens": tokens, "wall_ms": wall, "kernel_sum_ms": gpu_us / 1e3,
              "weight_floor_ms": floor, "kernels_per_step": sum(r["launches_per_step"] for r in rows),
              "rows": rows}
    print(f"{name} T={tokens}: wall {wall:.3f} ms, kernels {gpu_us / 1e3:.3f} ms "
          f"({result['kernels_per_step']:.0f} launches), weight floor {floor:.3f} ms")
    for r in rows[:25]:
        print(f"  {r['us_per_step']:8.1f} us  x{r['launches_per_step']:<5.1f} {r['kernel']}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_step_{name.replace('-tiny', '').replace('-', '')}_T{tokens}.json"),
              "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *(sys.argv[2:3] or []),
         *([int(sys.argv[3])] if len(sys.argv) > 3 else []))
