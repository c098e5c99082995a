"""Built-in model layers compiled with the kunlun backend vs inductor vs eager, on the GPU.

For each built-in model (one decoder layer at serving-like sizes, bf16) prints and
saves: CUDA kernels launched per call (counted with the profiler, the same way
for all three), fused-op matches, and time per call (CUDA-graph replay of one
forward, median), as ratios to inductor.

    python benchmarks/bench_fusion.py [OUT_DIR] [TOKENS]
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch
import triton

import kunlun_compile as kc
from kunlun_compile.models import build_model, builtin_names

SIZES = dict(num_hidden_layers=1, vocab_size=8192, hidden_size=2048, num_heads=16, num_kv_heads=4, head_dim=128,
             intermediate_size=6144, moe_intermediate_size=768, max_position_embeddings=8192)
MOE_SIZES = dict(num_experts=32, num_experts_per_tok=8)


def overrides(name):
    o = dict(SIZES)
    if name in ("qwen3-next-tiny",):
        o.update(head_dim=256, rotary_dim=64, num_heads=8, num_kv_heads=2)
    if "moe" in name or "next" in name or "deepseek" in name:
        o.update(MOE_SIZES)
        if "deepseek" in name:
            o.update(n_group=8, topk_group=4)  # 4 experts per group
    return o


def kernels_per_call(fn, args) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def graph_time_ms(fn, args, reps=50) -> float:
    """Median time of one call, replayed as a CUDA graph (no host dispatch in the number)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128  # the eager MoE gathers [T, k, 2I, H] weights
    rows = []
    for name in builtin_names():
        torch._dynamo.reset()
        model, inputs = build_model(name, dtype=torch.bfloat16, device="cuda", num_tokens=tokens, seed=0,
                                    **overrides(name))
        with torch.no_grad():
            kun = kc.compile(model, strict=True)
            ind = torch.compile(model, backend="inductor")
            want = model(*inputs)
            got_k, got_i = kun(*inputs), ind(*inputs)
            err_k = ((got_k.float() - want.float()).norm() / want.float().norm()).item()
            err_i = ((got_i.float() - want.float()).norm() / want.float().norm()).item()
            row = {"model": name, "tokens": tokens, "rel_err_vs_eager": {"kunlun": err_k, "inductor": err_i}}
            g = kun.kunlun_backend.report.graphs[0]
            row["patterns"] = {k: v for k, v in g.patterns.items() if v}
            row["graph_kernels"] = {"before": sum(g.kernels_before.values()), "after": dict(g.kernels)}
            for label, fn in (("eager", model), ("inductor", ind), ("kunlun", kun)):
                row[f"{label}_cuda_kernels"] = kernels_per_call(fn, inputs)
                row[f"{label}_ms"] = graph_time_ms(fn, inputs)
        row["kunlun_vs_inductor"] = row["kunlun_ms"] / row["inductor_ms"]
        row["kunlun_vs_eager"] = row["kunlun_ms"] / row["eager_ms"]
        rows.append(row)
        print(f"{name:18} kernels eager {row['eager_cuda_kernels']:4d} inductor {row['inductor_cuda_kernels']:4d} "
              f"kunlun {row['kunlun_cuda_kernels']:4d} | ms eager {row['eager_ms']:.3f} inductor "
              f"{row['inductor_ms']:.3f} kunlun {row['kunlun_ms']:.3f} (x{row['kunlun_vs_inductor']:.2f} of "
              f"inductor) | err {err_k:.1e}/{err_i:.1e} | {row['patterns']}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "sizes": SIZES, "moe_sizes": MOE_SIZES, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fusion_layers.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
