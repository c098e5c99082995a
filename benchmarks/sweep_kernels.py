"""Tile / launch sweeps for the kernels whose targets are not met yet (GPU).  Prints a table, writes JSON.

usage: python3 benchmarks/sweep_kernels.py [OUT_DIR]
           [prologue,moe,moe_tails,moe_occupancy,moe_mid,moe_decode,linear,gated_linear]
Each variant is checked against the reference before it is timed.
"""
import json
import os
import sys
from dataclasses import replace

import torch
import triton
from triton.testing import do_bench

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import fused_moe, linear, norm_rope_gate
from kunlun_compile.ops.moe_plan import plan_fused_moe
from kunlun_compile.ops.moe_routing import sort_pairs

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
dev = "cuda"


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def label_of(p):
    return (f"moe M={p.pairs // 8} {p.block_m}x{p.block_n}x{p.block_k} w{p.num_warps} s{p.num_stages} g{p.group_m} "
            f"sorted{int(p.sorted_act)} gemm2 {p.gemm2 or 'same'} tma{int(p.tma)}")


def kernel_profile(fn, calls=10):
    """ms per launch of each kernel `fn` runs, in launch order (GEMM1 and GEMM2 share a kernel name)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [ev for ev in prof.events() if ev.device_type.name == "CUDA"]
    per_call = len(events) // calls
    return {f"{i} {ev.name[:50]}": sum(e.device_time for e in events[i::per_call]) / calls / 1000
            for i, ev in enumerate(events[:per_call])}


def moe_tails_sweep():
    """M=8192 and M=1024 (E=128, top-8, H=2048, I=768): experts' last rows in half-height units
    (tail_m) against v9's plan, each variant profiled per kernel.  CUDA-graph replay."""
    def variants(plan):
        base = replace(plan, tail_m=0)
        tail = base.block_m // 2
        return [base, replace(base, tail_m=tail), replace(base, tail_m=tail, group_m=16),
                replace(base, tail_m=tail, group_m=4)]
    return moe_variants_sweep(variants)


def moe_occupancy_sweep():
    """M=8192: GEMM tiles whose operand stages fit two programs per SM (<= 113 KB of shared memory
    each; whether the registers allow it is printed per compiled kernel), against v12's plan, which
    runs one 192 KB program per SM with no overlap of one tile's epilogue with the next's loads."""
    def variants(plan):
        if plan.block_m != 128:
            return [plan]
        g2 = plan.gemm2[:3] + (plan.num_stages,)  # GEMM2 as in the plan while GEMM1's stages change
        gemm1 = [(64, 64, 8, 3), (64, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 4)]
        gemm2 = [(128, 64, 8, 3), (128, 64, 4, 3), (256, 32, 8, 4), (128, 128, 8, 2)]
        return ([plan] + [replace(plan, block_n=bn, block_k=bk, num_warps=w, num_stages=st, gemm2=g2)
                          for bn, bk, w, st in gemm1] + [replace(plan, gemm2=g) for g in gemm2])
    return moe_variants_sweep(variants)


def compiled_kernels(jit_fn):
    """{cache key: (registers, spills, shared bytes, warps)} of the kernels `jit_fn` has compiled."""
    out = {}
    for cache in getattr(jit_fn, "device_caches", {}).values():
        for key, k in cache[0].items():
            try:
                k._init_handles()
                out[key] = (k.n_regs, k.n_spills, k.metadata.shared, k.metadata.num_warps)
            except Exception:  # noqa: BLE001 - diagnostics only
                pass
    return out


def moe_variants_sweep(variants_of):
    """Plans `variants_of(plan at M)` at M=8192 and M=1024 (E=128, top-8, H=2048, I=768), each checked
    against the reference, timed by CUDA-graph replay and profiled per kernel.  Compare variants with
    each other: the x-floor column uses one matmul rate taken at the start, on a cool GPU, which reads
    up to ~15% above the rate under load (NOTES v13; bench_ops and moe_clocks.py measure it around)."""
    from triton.testing import do_bench_cudagraph

    from bench_ops import matmul_tflops

    E, H, I, k = 128, 2048, 768, 8
    tflops = matmul_tflops()
    res = {"bf16_matmul_TFLOPs": tflops}
    print(f"matmul {tflops:.0f} TFLOP/s", flush=True)
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    # MOE_VARIANTS=0,3 runs those only (a compile that hangs then costs one process, not the sweep)
    picked = os.environ.get("MOE_VARIANTS")
    for M in (8192, 1024):
        floor = 2 * M * k * 3 * H * I / (tflops * 1e9)
        x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
        tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
        want = fused_moe.reference(x, w13, w2, tw, ids)
        variants = variants_of(plan_fused_moe(M, k, E))
        variants = [variants[int(i)] for i in picked.split(",") if int(i) < len(variants)] if picked else variants
        gemm_kernel = fused_moe._moe_gemm_kernel._compiled_fn()
        for plan in variants:
            label = label_of(plan) + f" tail{plan.tail_m}"
            seen = compiled_kernels(gemm_kernel)
            try:
                err = rel(fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), want)
                assert err < 8e-3, err
                t = do_bench_cudagraph(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), rep=200)
                kernels = kernel_profile(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan))
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is recorded, not fatal
                t, err, kernels = None, repr(e)[:300], {}
            gemms = [round(v, 4) for name, v in kernels.items() if "gemm" in name]
            compiled = [v for key, v in compiled_kernels(gemm_kernel).items() if key not in seen]
            res[label] = {"ms": t, "err": err, "x_floor": t and t / floor, "kernels_ms": kernels,
                          "plan": plan.as_dict(), "new_gemm_kernels (regs, spills, shared, warps)": compiled}
            print(f"  new GEMM kernels (regs, spills, shared, warps): {compiled}", flush=True)
            print(f"{label}: {t} ms ({t / floor if t else float('nan'):.2f}x floor, err {err}) GEMMs {gemms} "
                  f"sum of kernels {sum(kernels.values()):.4f}", flush=True)
    return res


def moe_mid_sweep():
    """M=1024 and M=128 (64 and 8 pairs per expert at E=128, top-8): v9's large-plan options (swizzled
    grid, sorted SwiGLU output, GEMM2 tile, descriptors) on their 64- and 16-row plans; graph replay."""
    from triton.testing import do_bench_cudagraph

    E, H, I, k = 128, 2048, 768, 8
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    res = {}
    for M in (1024, 128):
        x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
        tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
        want = fused_moe.reference(x, w13, w2, tw, ids)
        base = plan_fused_moe(M, k, E)
        variants = [base, replace(base, group_m=8), replace(base, group_m=8, sorted_act=True),
                    replace(base, group_m=8, sorted_act=True, tma=True)]
        if M == 1024:
            variants += [replace(base, group_m=8, sorted_act=True, tma=True, gemm2=(128, 64, 4)),
                         replace(base, group_m=8, sorted_act=True, tma=True, gemm2=(256, 64, 8)),
                         replace(base, group_m=8, sorted_act=True, tma=True, num_stages=4),
                         replace(base, block_n=64, num_warps=4, group_m=8, sorted_act=True, tma=True, num_stages=4)]
        else:
            variants += [replace(base, group_m=8, sorted_act=True, tma=True, gemm2=(128, 64, 4)),
                         replace(base, block_k=64, group_m=8, sorted_act=True, tma=True)]
        for plan in variants:
            label = label_of(plan)
            try:
                err = rel(fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), want)
                assert err < 8e-3, err
                t = do_bench_cudagraph(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), rep=200)
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                t, err = None, repr(e)[:160]
            res[label] = {"ms": t, "err": err, "plan": plan.as_dict()}
            print(f"{label}: {t} ms (err {err})", flush=True)
    return res


def moe_sweep():
    """The large path at M=8192 (E=128, top-8, H=2048, I=768), CUDA-graph replay, against the matmul
    floor: tiles, the swizzled 1-D grid (group_m), GEMM1 writing the SwiGLU output in sorted order
    (sorted_act: GEMM2 reads contiguous tiles) and GEMM2's own tile; then a per-kernel profile of the
    best variant."""
    from triton.testing import do_bench_cudagraph

    from bench_ops import matmul_tflops

    E, H, I, k, M = 128, 2048, 768, 8, 8192
    tflops = matmul_tflops()
    floor = 2 * M * k * 3 * H * I / (tflops * 1e9)
    res = {"bf16_matmul_TFLOPs": tflops, "moe M=8192 floor_ms": floor}
    print(f"matmul {tflops:.0f} TFLOP/s, floor {floor:.4f} ms", flush=True)
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
    want = fused_moe.reference(x, w13, w2, tw, ids)
    base = plan_fused_moe(M, k, E)
    # (bm, bn, bk, warps, stages, group_m, sorted_act, gemm2 (bn, bk, warps) or (), tma); the first two are
    # the v2 plan and v9's best without descriptors
    confs = [(128, 128, 64, 8, 3, 0, False, (), False), (128, 128, 64, 8, 3, 8, True, (256, 64, 8), False),
             (128, 128, 64, 8, 4, 8, True, (256, 64, 8), True), (128, 128, 64, 8, 4, 16, True, (256, 64, 8), True),
             (128, 128, 64, 8, 4, 4, True, (256, 64, 8), True), (128, 128, 64, 8, 4, 8, True, (128, 64, 8), True),
             (128, 128, 64, 8, 4, 8, True, (128, 128, 8), True), (128, 64, 64, 4, 4, 8, True, (256, 64, 8), True),
             (128, 64, 64, 8, 5, 8, True, (256, 64, 8), True), (128, 128, 64, 4, 4, 8, True, (256, 64, 8), True),
             (64, 128, 64, 4, 4, 8, True, (256, 64, 8), True), (128, 256, 64, 8, 3, 8, True, (256, 64, 8), True)]
    best = None
    for bm, bn, bk, warps, stages, group, srt, g2, tma in confs:
        plan = replace(base, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, group_m=group,
                       sorted_act=srt, gemm2=g2, tma=tma)
        label = label_of(plan)
        try:
            err = rel(fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), want)
            assert err < 8e-3, err
            t = do_bench_cudagraph(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan), rep=200)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is recorded, not fatal
            t, err = None, repr(e)[:160]
        res[label] = {"ms": t, "err": err, "x_floor": t and t / floor, "plan": plan.as_dict()}
        print(f"{label}: {t} ms ({t / floor if t else float('nan'):.2f}x floor, err {err})", flush=True)
        if t is not None and (best is None or t < best[0]):
            best = (t, plan)
    res["moe M=8192 sort_pairs graph ms"] = do_bench_cudagraph(lambda: sort_pairs(ids, E, 128, "block-histogram"))
    plan = best[1]
    kernels = kernel_profile(lambda: fused_moe.triton_impl(x, w13, w2, tw, ids, plan=plan))
    print(f"best plan {label_of(plan)} per-kernel ms:", json.dumps(kernels, indent=0), flush=True)
    res["moe M=8192 best kernels ms"] = kernels
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
                for bn, bk, w in [(bn, bk, w) for bn in (2, 4, 8, 16) for bk in (128, 256, 512, 1024) for w in (2, 4, 8)
                                  if bn * bk <= 2048 * w]:  # gate + up fp32 tiles within ~128 registers a thread
                    p = replace(pp, block_n=bn, block_k=bk, num_warps=w)
                    times[label(p)] = (run(label(p), p), p)
                g1 = min((v for lab, v in times.items() if lab != "scan"), key=lambda v: v[0])[1]
                # the [k=8, BN, BK] fp32 tile within ~128 registers
                for bn, bk, w in [(bn, bk, w) for bn in (1, 2, 4, 8) for bk in (64, 128, 256, 512, 1024)
                                  for w in (2, 4, 8) if bn * bk <= 512 * w]:
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
    """Prologue at T=16384 against the copy floor (read q, gate, k; write the same), over tilings:
    Qwen3-Next (16/2 heads of 256, rotary 64, gated, Gemma norm) and Qwen3 (32/4 of 128); graph replay."""
    from triton.testing import do_bench_cudagraph

    from bench_runtime import copy_gbps

    T = 16384
    gbps = copy_gbps()
    res = {"copy_GBps": gbps}
    for name, (nq, nkv, D, rot, gated, offset) in {"qwen3next": (16, 2, 256, 64, True, 1.0),
                                                   "qwen3": (32, 4, 128, 128, False, 0.0)}.items():
        floor = 2 * T * ((2 if gated else 1) * nq + nkv) * D * 2 / (gbps * 1e6)
        qkv = torch.randn(T, norm_rope_gate.qkv_columns(nq, nkv, D, gated), device=dev, dtype=torch.bfloat16)
        w = (0.3 * torch.randn(D, device=dev)).to(torch.bfloat16)
        cache = torch.randn(65536, rot, device=dev)
        pos = torch.randint(0, 65536, (T,), device=dev)
        args = (qkv, w, w, cache, pos, nq, nkv, D, rot, 1e-6, offset, gated, True)
        want = norm_rope_gate.reference(*args)
        res[f"prologue {name} floor_ms"] = floor
        print(f"{name}: default tiling {norm_rope_gate.launch_shape(T, nq + nkv, D)}", flush=True)
        for tiling in [None, (1, 1, 1), (1, 1, 2), (2, 1, 2), (4, 1, 4), (1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 4, 4),
                       (2, 2, 4), (4, 1, 2)]:
            norm_rope_gate.LAUNCH_OVERRIDE = tiling
            got = torch.ops.kunlun.split_norm_rope_gate(*args)
            assert all((g != w_).float().mean().item() < 0.01 for g, w_ in zip(got, want) if g.numel())
            t = do_bench_cudagraph(lambda: torch.ops.kunlun.split_norm_rope_gate(*args), rep=200)
            label = f"prologue {name} T=16384 {tiling or 'default'}"
            res[label] = {"ms": t, "pct_copy_bw": 100 * floor / t}
            print(f"{label}: {t:.4f} ms = {100 * floor / t:.1f}% of copy bw", flush=True)
        norm_rope_gate.LAUNCH_OVERRIDE = None
    return res


# (N, K) of the bench_runtime models' linears: qkv, o, router, lm head (Qwen3-MoE); qkv+gate, o,
# shared expert gate|up, down and gate (Qwen3-Next)
LINEAR_SHAPES = [(2560, 2048), (2048, 2048), (64, 2048), (4096, 2048), (9216, 2048), (2048, 4096), (1536, 2048),
                 (2048, 768), (1, 2048)]


def linear_sweep():
    """kunlun::linear's GEMV against cuBLAS (F.linear) at decode rows.  Each timed graph runs the op over
    enough copies of the weight (>= 128 MB in all) that every read comes from HBM, as in a model step
    where a layer's weights have left L2 by the next step; time per call = graph time / copies."""
    from triton.testing import do_bench_cudagraph

    from bench_runtime import copy_gbps

    gbps = copy_gbps()
    res = {"copy_GBps": gbps}
    for N, K in LINEAR_SHAPES:
        nbytes = N * K * 2
        copies = min(max(-(-(128 << 20) // nbytes), 4), 256)
        ws = [(torch.randn(N, K, device=dev) / K ** 0.5).to(torch.bfloat16) for _ in range(copies)]
        floor = nbytes / (gbps * 1e6)
        for M in (1, 2, 4, 8, 16):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            want = torch.nn.functional.linear(x.double(), ws[0].double())

            def timed(fn):
                return do_bench_cudagraph(lambda: [fn(w) for w in ws], rep=30) / copies

            cublas = timed(lambda w: torch.nn.functional.linear(x, w))
            base = linear.plan_linear(M, N, K)
            if base.path != "gemv":
                base = replace(linear.plan_linear(1, N, K), rows=triton.next_power_of_2(M))
            grid = [base]
            if M in (1, 4):
                grid += [replace(base, block_n=bn, block_k=bk, num_warps=w) for bn in (1, 2, 4, 8, 16)
                         for bk in (128, 256, 512, 1024) for w in (2, 4, 8) if bn > 1 or N < 512]
            times = []
            for p in grid:
                try:
                    got = linear.triton_impl(x, ws[0], plan=p)
                    err = rel(got, want)
                    assert err < 8e-3, err
                    t = timed(lambda w: linear.triton_impl(x, w, plan=p))
                except Exception as e:  # noqa: BLE001 - a tile that fails is recorded, not fatal
                    t, err = float("inf"), repr(e)[:120]
                times.append((t, p))
                res[f"linear N={N} K={K} M={M} {p.rows}x{p.block_n}x{p.block_k}w{p.num_warps}"] = {
                    "ms": t, "err": err, "floor_ms": floor, "cublas_ms": cublas, "default": p == base}
            best = min(times, key=lambda v: v[0])
            print(f"N={N} K={K} M={M}: floor {floor * 1e3:.1f} us | cuBLAS {cublas * 1e3:.1f} | default "
                  f"{times[0][0] * 1e3:.1f} ({base.block_n}x{base.block_k}w{base.num_warps}) | "
                  f"best {best[0] * 1e3:.1f} "
                  f"({best[1].block_n}x{best[1].block_k}w{best[1].num_warps})", flush=True)
    return res


def gated_linear_sweep():
    """kunlun::gated_linear's GEMV (prologue x*act(gate) on its K tiles, optional row-gate/addend epilogue)
    against the plain GEMV on a ready product, at one row, HBM-cold weights as in `linear_sweep`: what the
    recomputed prologue costs per program, and whether wider column blocks (fewer recomputations) pay."""
    from triton.testing import do_bench_cudagraph

    from kunlun_compile.ops import gated_linear

    res = {}
    for N, K, act, epi in [(2048, 4096, "sigmoid", False), (2048, 768, "silu", True)]:
        copies = min(max(-(-(128 << 20) // (N * K * 2)), 4), 256)
        ws = [(torch.randn(N, K, device=dev) / K ** 0.5).to(torch.bfloat16) for _ in range(copies)]
        gu = torch.randn(1, 2 * K, device=dev, dtype=torch.bfloat16)
        gate, x = gu[:, :K], gu[:, K:]
        rg = torch.randn(1, 1, device=dev, dtype=torch.bfloat16) if epi else None
        r = torch.randn(1, N, device=dev, dtype=torch.bfloat16) if epi else None
        prod = gated_linear.reference(x, gate, torch.eye(K, device=dev, dtype=torch.bfloat16), act)
        want = gated_linear.reference(x.double(), gate.double(), ws[0].double(), act,
                                      None if rg is None else rg.double(), None if r is None else r.double())

        def timed(fn):
            return do_bench_cudagraph(lambda: [fn(w) for w in ws], rep=30) / copies

        base = linear.plan_linear(1, N, K)
        plain = timed(lambda w: linear.triton_impl(prod, w, plan=base))
        rows = [("plain GEMV on the product", base, plain)]
        for bn in (1, 2, 4, 8):
            for bk in (256, 512, 1024):
                for nw in (2, 4):
                    p = replace(base, block_n=bn, block_k=min(bk, triton.next_power_of_2(K)), num_warps=nw)
                    got = gated_linear.triton_impl(x, gate, ws[0], act, rg, r, plan=p)
                    err = rel(got, want)
                    t = timed(lambda w: gated_linear.triton_impl(x, gate, w, act, rg, r, plan=p)) if err < 8e-3 \
                        else float("inf")
                    rows.append((f"gated {bn}x{p.block_k}w{nw}" + (" (default)" if p == base else ""), p, t))
        for label, _plan, t in rows:
            res[f"gated N={N} K={K} {act}{' +epilogue' if epi else ''} {label}"] = {"ms": t}
        best = min(rows[1:], key=lambda v: v[2])
        default = next(t for label, _, t in rows if "(default)" in label)
        print(f"gated N={N} K={K} {act}{' +epi' if epi else ''}: plain GEMV {plain * 1e3:.2f} us | gated default "
              f"{default * 1e3:.2f} | best {best[2] * 1e3:.2f} ({best[0]})", flush=True)
    return res


if __name__ == "__main__":
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    sections = sys.argv[2].split(",") if len(sys.argv) > 2 else ["prologue", "moe", "moe_decode"]
    for name in sections:
        out.update({"prologue": prologue_sweep, "moe": moe_sweep, "moe_mid": moe_mid_sweep,
                    "moe_decode": moe_decode_sweep, "moe_tails": moe_tails_sweep, "moe_occupancy": moe_occupancy_sweep,
                    "linear": linear_sweep,
                    "gated_linear": gated_linear_sweep}[name]())
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "sweep.json"), "w") as f:
        json.dump(out, f, indent=1)
