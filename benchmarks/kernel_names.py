"""The CUDA kernels one call launches, by name, for eager / inductor / kunlun / kunlun with fusions off.

Where `bench_fusion.py` counts kernels, this names them, side by side, so a count that differs from
inductor's says which kernels are the extra ones.

    python benchmarks/kernel_names.py [TOKENS] [MODELS]     (MODELS: comma list of bench_fusion's names)
"""
from __future__ import annotations

import sys

import torch

import kunlun_compile as kc
import bench_fusion as bf


def kernel_names(fn, args):
    fn(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    return [(e.name, e.device_time) for e in events]


def main():
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else ["hf-llama"]
    for name, build in bf.cases(tokens):
        if name not in only:
            continue
        torch._dynamo.reset()
        model, inputs = build()
        with torch.no_grad():
            variants = {"inductor": torch.compile(model, backend="inductor"),
                        "kunlun": kc.compile(model, strict=True, graph_mode="none"),
                        "kunlun_nofusion": kc.compile(model, strict=True, graph_mode="none", fusion=False)}
            for label, fn in variants.items():
                names = kernel_names(fn, inputs)
                print(f"== {name} {tokens} tokens, {label}: {len(names)} kernels, "
                      f"{sum(t for _, t in names):.1f} us of kernel time")
                for n, t in names:
                    print(f"   {t:8.1f}  {n[:150]}")


if __name__ == "__main__":
    main()
