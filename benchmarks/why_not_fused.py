"""Compile one HF layer from bench_fusion on the GPU and print every pass's near misses and the graph's expert ops,
to see why a family that fuses on the CPU does not on CUDA.

    python benchmarks/why_not_fused.py hf-qwen3-moe [TOKENS]
"""
from __future__ import annotations

import sys
from collections import Counter

import torch

import kunlun_compile as kc
from benchmarks.bench_fusion import hf_layer


def main():
    kind = sys.argv[1]
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, inputs = hf_layer(kind, tokens, device, torch.bfloat16)
    captured = []

    def keep(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    with torch.no_grad():
        kun = kc.compile(model, strict=True, graph_mode="none")
        kun(*inputs)
        torch._dynamo.reset()
        torch.compile(model, backend=keep)(*inputs)
    g = kun.kunlun_backend.report.graphs[0]
    print({k: v for k, v in g.patterns.items() if v})
    for p in g.passes:
        for m in p.near_misses:
            print(f"near miss ({p.name}): {m}")
    if "--code" in sys.argv:
        print(captured[0].code)
    ops = Counter(str(n.target) for gm in captured for n in gm.graph.nodes if n.op == "call_function")
    print("dynamo graph ops around experts:", {k: v for k, v in ops.items()
                                              if any(s in k for s in ("grouped", "histc", "bincount", "mm", "index"))})


if __name__ == "__main__":
    main()
