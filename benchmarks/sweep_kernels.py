"""Tile / launch sweeps for the kernels whose targets are not met yet (GPU).  Prints a table, writes JSON.

usage: python3 benchmarks/sweep_kernels.py [OUT_DIR] [prologue,moe,moe_decode]
Each variant is checked against the reference before it is timed.
"""
import json
import os
import sys
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

import kunlun_compile  # noqa: F401
from kunlun_compile.ops import fused_moe, norm_rope_gate
from kunlun_compile.ops.moe_plan import plan_fused_moe
from kunlun_compile.ops.moe_routing import sort_pairs

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
dev = "cuda"


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def moe_sweep():
    E, H, I, k = 128, 2048, 768, 8
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    res = {}
    variants = {
        1: [(16, n, kk, w, s) for n in (16, 32, 64) for kk in (128, 256) for w in (2, 4) for s in (3, 4)],
        16: [(16, n, kk, w, s) for n in (16, 32, 64) for kk in (128, 256) for w in (4,) for s in (3, 4)],
        8192: [(128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
               (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 128, 8, 3), (64, 64, 128, 4, 3),
               (128, 32, 64, 4, 4)],
    }
    for M, confs in variants.items():
        x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
        tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
        want = fused_moe.reference(x, w13, w2, tw, ids)
        base = replace(plan_fused_moe(M, k, E), swiglu_fused=True)
        for bm, bn, bk, warps, stages in confs:
            plan = replace(base, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            try:
                err = rel(fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), want)
                assert err < 8e-3, err
                t = bench(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan))
            except Exception as e:  # a tile that does not compile (shared memory) is recorded, not fatal
                t, err = None, repr(e)[:120]
            res[f"moe M={M} {bm}x{bn}x{bk} w{warps} s{stages}"] = {"ms": t, "err": err}
            print(f"moe M={M} {bm}x{bn}x{bk} w{warps} s{stages}: {t} (err {err})", flush=True)
        if M == 8192:
            t = bench(lambda: sort_pairs(ids, E, 128, "block-histogram"))
            res["moe M=8192 sort_pairs block-histogram"] = {"ms": t}
            t2 = bench(lambda: sort_pairs(ids, E, 128, "argsort"))
            res["moe M=8192 sort_pairs argsort"] = {"ms": t2}
            print(f"sort_pairs M=8192: histogram {t:.4f} ms, argsort {t2:.4f} ms", flush=True)
    return res


def moe_decode_sweep():
    """Per-pair GEMV tiles vs the scan path at decode sizes, timed as CUDA-graph replays (the op's
    launches at M=1 are ~40 µs of GPU time; per-call timing would measure the host).  E=128, M=1:
    GEMM1's tile over a grid (GEMM2's fixed), then GEMM2's with the best GEMM1; other sizes: the
    scan plan against the 4 best."""
    from triton.testing import do_bench_cudagraph

    from bench_runtime import copy_gbps

    H, I, k = 2048, 768, 8
    gbps = copy_gbps()
    res = {"copy_GBps": gbps}
    pp = plan_fused_moe(1, k, 128)
    for E in (128, 64):
        w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
        w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
        for M in (1, 2, 4, 8):
            x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
            tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
            want = fused_moe.reference(x, w13, w2, tw, ids)
            floor = ids.unique().numel() * 3 * H * I * 2 / (gbps * 1e6)
            scan = replace(plan_fused_moe(3, k, E), pairs=M * k, block_m=min(max(triton.next_power_of_2(M), 16), 64))

            def run(label, plan):
                try:
                    err = rel(fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), want)
                    assert err < 8e-3, err
                    t = do_bench_cudagraph(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), rep=100)
                except Exception as e:  # noqa: BLE001 - a tile that fails is recorded, not fatal
                    t, err = None, repr(e)[:120]
                res[f"moe-decode E={E} M={M} {label}"] = {"ms": t, "err": err, "floor_ms": floor,
                                                          "plan": plan.as_dict()}
                return t if t is not None else float("inf")

            def label(p):
                return f"per-pair g1 {p.block_n}x{p.block_k}w{p.num_warps} g2 {'x'.join(map(str, p.gemm2_tiles()))}"

            times = {"scan": (run("scan", scan), scan)}
            if E == 128 and M == 1:
                for bn, bk, w in [(bn, bk, w) for bn in (4, 8, 16) for bk in (128, 256) for w in (4, 8)]:
                    p = replace(pp, block_n=bn, block_k=bk, num_warps=w)
                    times[label(p)] = (run(label(p), p), p)
                g1 = min((v for lab, v in times.items() if lab != "scan"), key=lambda v: v[0])[1]
                for bn, bk, w in [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (64, 128, 256) for w in (4, 8)]:
                    p = replace(g1, gemm2=(bn, bk, w))
                    times[label(p)] = (run(label(p), p), p)
                top = sorted((v for lab, v in times.items() if lab != "scan"), key=lambda v: v[0])[:4]
                candidates = [p for _, p in top] + [pp]
            else:
                for p in candidates:
                    times[label(p)] = (run(label(p), p), p)
            ranked = sorted((t, lab) for lab, (t, _) in times.items())
            print(f"E={E} M={M} floor {floor:.4f} ms | scan {times['scan'][0]:.4f} | default "
                  f"{times.get(label(pp), (float('nan'),))[0]:.4f} | best " +
                  ", ".join(f"{lab} {t:.4f} ({t / floor:.2f}x)" for t, lab in ranked[:4]), flush=True)
    return res


def prologue_sweep():
    nq, nkv, D, rot = 16, 2, 256, 64
    T = 16384
    qkv = torch.randn(T, norm_rope_gate.qkv_columns(nq, nkv, D, True), device=dev, dtype=torch.bfloat16)
    w = (0.3 * torch.randn(D, device=dev)).to(torch.bfloat16)
    cache = torch.randn(65536, rot, device=dev)
    pos = torch.randint(0, 65536, (T,), device=dev)
    args = (qkv, w, w, cache, pos, nq, nkv, D, rot, 1e-6, 1.0, True, True)
    want = norm_rope_gate.reference(*args)
    res = {}
    for tiling in [(8, 1, 4), (8, 1, 8), (4, 1, 4), (4, 1, 2), (2, 1, 2), (1, 1, 1), (1, 1, 2), (16, 1, 8),
                   (2, 2, 4), (1, 2, 2)]:
        norm_rope_gate.LAUNCH_OVERRIDE = tiling
        got = torch.ops.kunlun.split_norm_rope_gate(*args)
        assert all((g != w_).float().mean().item() < 0.01 for g, w_ in zip(got, want))
        res[f"prologue qwen3next T=16384 {tiling}"] = {"ms": bench(lambda: torch.ops.kunlun.split_norm_rope_gate(*args))}
        print(tiling, res[f"prologue qwen3next T=16384 {tiling}"], flush=True)
    norm_rope_gate.LAUNCH_OVERRIDE = None
    return res


if __name__ == "__main__":
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    sections = sys.argv[2].split(",") if len(sys.argv) > 2 else ["prologue", "moe", "moe_decode"]
    for name in sections:
        out.update({"prologue": prologue_sweep, "moe": moe_sweep, "moe_decode": moe_decode_sweep}[name]())
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "sweep.json"), "w") as f:
        json.dump(out, f, indent=1)
