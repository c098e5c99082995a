"""fused_moe on [E, K, N] (k-major) expert weights vs row-major ones vs the dense bmm form Llama4 writes, at
Llama4-like sizes (E=32, H=2048, I=768, top-1), bf16: which plan reads k-major weights at full speed.

    python benchmarks/moe_kmajor_probe.py OUT_DIR   -> OUT_DIR/moe_kmajor_probe.json (rewritten after each row)
"""
import dataclasses
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kunlun_compile.ops import fused_moe as fm
from kunlun_compile.ops.moe_plan import plan_fused_moe

E, H, I = 32, 2048, 768


def dense(x, w_up, w_down, scores):  # the unfused graph: every token through every expert
    routed = x.repeat(E, 1) * scores.t().reshape(-1, 1)
    gate, up = torch.bmm(routed.view(E, -1, H), w_up).chunk(2, dim=-1)
    return torch.bmm(up * F.silu(gate), w_down).view(E, -1, H).sum(0)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    w_up = (torch.randn(E, H, 2 * I, device="cuda", generator=g) / H ** 0.5).bfloat16()  # [E, K, N]
    w_down = (torch.randn(E, I, H, device="cuda", generator=g) / I ** 0.5).bfloat16()
    k_major = (w_up.transpose(1, 2), w_down.transpose(1, 2))
    row_major = tuple(w.contiguous() for w in k_major)
    for tokens in (1, 4, 16, 128):  # top-1: one token reads one expert fused, all 32 through the bmm's
        x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
        ids = torch.randint(0, E, (tokens, 1), device="cuda", generator=g)
        tw = torch.ones(tokens, 1, device="cuda", dtype=torch.bfloat16)
        scores = torch.zeros(tokens, E, device="cuda", dtype=torch.bfloat16).scatter(1, ids, 1.0)
        want = dense(x, w_up, w_down, scores).float()
        base = plan_fused_moe(tokens, 1, E)
        plans = {"default": base,
                 "per-pair bn64 bk32": dataclasses.replace(plan_fused_moe(1, 1, E), block_n=64, block_k=32,
                                                           gemm2=(64, 32, 4)),
                 "scan bm16": dataclasses.replace(plan_fused_moe(128, 1, E), block_m=16),
                 "argsort bm16": plan_fused_moe(64, 8, E),
                 "block-histogram bm16": plan_fused_moe(800, 1, E)}
        variants = [("dense bmm (unfused)", lambda: dense(x, w_up, w_down, scores))]
        for wname, (w13, w2) in (("k-major", k_major), ("row-major", row_major)):
            for pname, plan in plans.items():
                variants.append((f"fused {wname} {pname}",
                                 lambda w13=w13, w2=w2, plan=plan: fm.triton_impl(x, w13, w2, tw, ids, "silu", plan)))
        for name, fn in variants:
            try:
                err = ((fn().float() - want).norm() / want.norm()).item()
                ms = do_bench(fn, warmup=10, rep=40)
            except Exception as e:  # noqa: BLE001 - a plan the kernel cannot take is a finding
                err, ms = None, f"{type(e).__name__}: {str(e)[:120]}"
            rows.append({"tokens": tokens, "variant": name, "ms": ms, "rel_err_vs_dense": err})
            print(f"T={tokens:4d} {name:40} {ms if isinstance(ms, str) else f'{ms:.4f} ms'} err {err}", flush=True)
            with open(os.path.join(out, "moe_kmajor_probe.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "sizes": dict(E=E, H=H, I=I, top_k=1), "rows": rows}, f,
                          indent=1)


if __name__ == "__main__":
    main()
