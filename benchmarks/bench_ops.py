"""kunlun:: ops on the GPU beside eager and inductor on the same reference code, against the floor.

usage: python3 benchmarks/bench_ops.py [OUT_DIR] [section,...]   -> ops.json, ops.png, a table on stdout
sections: add_rmsnorm, masked_input, prologue, moe_gate, fused_moe, attention_mask (default: all)
Floor = bytes that must move (each input read once, each output written once) at the measured
device-copy bandwidth, or for the MoE GEMMs the larger of that and the flops at the bf16 matmul rate
measured just before and after that row (the rate falls as the GPU warms under load).  Times are medians of
triton.testing.do_bench (CUDA events).
"""
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.models.layers import GemmaRMSNorm, RMSNorm, get_masked_input_and_mask

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
SECTIONS = sys.argv[2].split(",") if len(sys.argv) > 2 else None
dev = "cuda"


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def kernels(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in p.events() if e.device_type.name == "CUDA")


def copy_bandwidth_gbps():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e6


def mismatch(got, want):
    """Share of output elements not bit-equal to eager's (first output)."""
    return (got[0] != want[0]).float().mean().item()


def graph_ms(fn):
    """GPU time without host dispatch: the call captured once in a CUDA graph, replays timed.
    None where the variant cannot be captured (eager code that reads back to the host)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)
    except Exception:  # noqa: BLE001 - recorded as not capturable
        torch.cuda.synchronize()
        return None


def matmul_tflops():
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / bench(lambda: x @ x) / 1e9


def row(name, size, floor_bytes, bw, fns, check, want=None, floor_ms=None):
    """floor_ms: a number, or a function of the row's timings' (start, end) matmul rates (see fused_moe_rows)."""
    r = {"op": name, "size": size, "floor_ms": floor_ms if floor_ms is not None else floor_bytes / (bw * 1e6)}
    rate_before = matmul_tflops() if callable(floor_ms) else None
    if want is not None:
        r["inductor_mismatch_vs_eager"] = mismatch(fns["inductor"](), want)
        r["kunlun_mismatch_vs_eager"] = mismatch(fns["kunlun"](), want)
    check(fns["kunlun"])  # ours must reproduce eager; the others are recorded, not checked
    for label, fn in fns.items():
        r[f"{label}_ms"] = bench(fn)
        r[f"{label}_graph_ms"] = graph_ms(fn)
        r[f"{label}_kernels"] = kernels(fn)
    if callable(floor_ms):
        r["matmul_TFLOPs_around_row"] = (rate_before, matmul_tflops())
        r["floor_ms"] = floor_ms(*r["matmul_TFLOPs_around_row"])
    r["kunlun_frac_of_bw"] = r["floor_ms"] / r["kunlun_ms"]
    if r["kunlun_graph_ms"]:
        r["kunlun_graph_frac_of_bw"] = r["floor_ms"] / r["kunlun_graph_ms"]
    r["kunlun_vs_inductor"] = r["kunlun_ms"] / r["inductor_ms"]
    r["kunlun_vs_eager"] = r["kunlun_ms"] / r["eager_ms"]
    return r


def add_rmsnorm_rows(bw):
    rows = []
    for H, gemma in [(2048, False), (4096, False), (2048, True)]:
        norm = (GemmaRMSNorm(H) if gemma else RMSNorm(H)).to(dev, torch.bfloat16)
        offset = 1.0 if gemma else 0.0
        compiled = torch.compile(norm, dynamic=False)
        for T in [1, 64, 1024, 16384]:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            r = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            want = norm(x, r)

            def check(fn):
                out, new_r = fn()
                assert torch.equal(new_r, want[1]), "residual differs"
                assert (out != want[0]).float().mean().item() < 0.01, "output differs"

            fns = {"eager": lambda: norm(x, r), "inductor": lambda: compiled(x, r),
                   "kunlun": lambda: torch.ops.kunlun.fused_add_rmsnorm(x, r, norm.weight, norm.eps, offset)}
            rows.append(row(f"add_rmsnorm{'_gemma' if gemma else ''}_H{H}", T, 4 * T * H * 2 + H * 2, bw, fns,
                            check, want))
            print(rows[-1], flush=True)
    return rows


def masked_input_rows(bw):
    rows = []
    args = (38016, 76032, 0, 152064, 152064)
    compiled = torch.compile(get_masked_input_and_mask, dynamic=False)
    for T in [64, 8192, 1 << 20]:
        ids = torch.randint(0, 152064, (T,), device=dev)
        want = get_masked_input_and_mask(ids, *args)

        def check(fn):
            got = fn()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

        fns = {"eager": lambda: get_masked_input_and_mask(ids, *args), "inductor": lambda: compiled(ids, *args),
               "kunlun": lambda: torch.ops.kunlun.masked_input(ids, *args)}
        rows.append(row("masked_input", T, T * (8 + 8 + 1), bw, fns, check, want))
        print(rows[-1], flush=True)
    return rows


def prologue_rows(bw):
    from kunlun_compile.ops import norm_rope_gate
    rows = []
    for name, nq, nkv, D, rot, gate, offset in [("qwen3next", 16, 2, 256, 64, True, 1.0),
                                                  ("qwen3", 32, 4, 128, 128, False, 0.0)]:
        cache = torch.randn(65536, rot, device=dev)  # fp32, as the model's RotaryEmbedding keeps it
        qw = (0.3 * torch.randn(D, device=dev) + (offset == 0)).to(torch.bfloat16)
        kw = (0.3 * torch.randn(D, device=dev) + (offset == 0)).to(torch.bfloat16)
        compiled = torch.compile(norm_rope_gate.reference, dynamic=False)
        for T in [1, 64, 1024, 16384]:
            qkv = torch.randn(T, norm_rope_gate.qkv_columns(nq, nkv, D, gate), device=dev, dtype=torch.bfloat16)
            pos = torch.randint(0, 65536, (T,), device=dev)
            args = (qkv, qw, kw, cache, pos, nq, nkv, D, rot, 1e-6, offset, gate, True)
            want = norm_rope_gate.reference(*args)

            def check(fn):
                got = fn()
                for g, w in zip(got, want):
                    if g.numel():
                        assert (g != w).float().mean().item() < 0.01, "prologue output differs from eager"

            moved = T * (nq * (2 if gate else 1) + nkv) * D * 2 * 2 + T * (rot * 4 + 8)
            fns = {"eager": lambda: norm_rope_gate.reference(*args), "inductor": lambda: compiled(*args),
                   "kunlun": lambda: torch.ops.kunlun.split_norm_rope_gate(*args)}
            r = row(f"norm_rope_gate_{name}", T, moved, bw, fns, check, want)
            if T == 16384:  # tilings (tokens x heads per program) beside the default
                r["tilings_ms"] = {}
                for tiling in [(1, 8 * 256 // D), (8 * 256 // D, 1), (2, 4 * 256 // D), (16 * 256 // D, 1)]:
                    norm_rope_gate.LAUNCH_OVERRIDE = (*tiling, 4)
                    check(fns["kunlun"])
                    r["tilings_ms"][f"{tiling[0]}x{tiling[1]}"] = bench(fns["kunlun"])
                norm_rope_gate.LAUNCH_OVERRIDE = None
            rows.append(r)
            print(rows[-1], flush=True)
    return rows


def moe_gate_rows(bw):
    from kunlun_compile.models.layers import select_experts
    rows = []
    for name, E, k, scoring, groups, tg, has_bias, scale in [("qwen3moe", 128, 8, "softmax", 1, 1, False, 1.0),
                                                             ("deepseekv3", 256, 8, "sigmoid", 8, 4, True, 2.5)]:
        bias = 0.1 * torch.randn(E, device=dev) if has_bias else None
        compiled = torch.compile(select_experts, dynamic=False)
        for M in [1, 16, 8192]:
            logits = torch.randn(M, E, device=dev)
            args = (logits, k, scoring, True, groups, tg, bias, scale)
            want = select_experts(*args)

            def check(fn):
                w, ids = fn()
                same = (torch.sort(ids, 1)[0] == torch.sort(want[1], 1)[0]).all(1).float().mean().item()
                assert same > 0.999, f"expert choice differs for {1 - same:.2%} of tokens"

            fns = {"eager": lambda: select_experts(*args), "inductor": lambda: compiled(*args),
                   "kunlun": lambda: torch.ops.kunlun.moe_gate(*args)}
            rows.append(row(f"moe_gate_{name}", M, M * E * 4 + M * k * 8, bw, fns, check))
            print(rows[-1], flush=True)
    return rows


def moe_experts_grouped_mm(x, w13, w2, topk_weights, topk_ids):
    """The eager/inductor formulation: sort by expert, torch._grouped_mm twice, scatter back."""
    k = topk_ids.shape[1]
    flat = topk_ids.flatten().long()
    order = flat.argsort()
    tok = order // k
    offs = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x[tok], w13.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    o = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    o = o * topk_weights.flatten()[order].unsqueeze(-1).to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


def fused_moe_rows(bw):
    from dataclasses import replace

    from kunlun_compile.ops import fused_moe
    from kunlun_compile.ops.moe_plan import plan_fused_moe
    rows = []
    E, H, I, k = 128, 2048, 768, 8
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    gate_w = torch.randn(E, H, device=dev, dtype=torch.bfloat16) * 0.02
    compiled = torch.compile(moe_experts_grouped_mm, dynamic=False)
    for M in [1, 16, 128, 1024, 8192]:
        x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
        tw, ids = torch.ops.kunlun.moe_gate(x @ gate_w.T, k, "softmax", True, 1, 1, None, 1.0)
        args = (x, w13, w2, tw, ids)
        want = fused_moe.reference(*args)
        plan = plan_fused_moe(M, k, E)
        flipped = replace(plan, swiglu_fused=not plan.swiglu_fused)

        def check(fn):
            got = fn()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 8e-3, f"fused_moe differs from the reference by {err:.2e}"

        distinct = ids.unique().numel()
        moved = distinct * 3 * H * I * 2 + 2 * M * H * 2

        # the matmul rate at the start of the run (GPU cool, boost clock) runs up to ~15% above the rate
        # a minute of load later (700 W cap: 1980 -> ~1440 MHz; moe_clocks.py), so the flops floor takes
        # the mean of the rates measured just before and just after this row's timings
        def floor(before, after, moved=moved, M=M):
            return max(moved / (bw * 1e6), 2 * M * k * 3 * H * I / ((before + after) / 2 * 1e9))
        fns = {"eager": lambda: moe_experts_grouped_mm(*args), "inductor": lambda: compiled(*args),
               "kunlun": lambda: torch.ops.kunlun.fused_moe(*args, "silu"),
               "kunlun_swiglu_flipped": lambda: fused_moe.triton_impl(*args, plan=flipped)}
        r = row("fused_moe", M, moved, bw, fns, check, floor_ms=floor)
        r["plan"] = plan.as_dict()
        r["distinct_experts"] = distinct
        rows.append(r)
        print(rows[-1], flush=True)
    return rows


def attention_mask_rows(bw):
    from kunlun_compile.models.layers import build_attention_mask
    rows = []
    compiled = torch.compile(build_attention_mask, dynamic=False)
    for T in [1024, 8192]:
        pos = torch.arange(T, device=dev) + 17
        for window in [None, 512]:
            want = build_attention_mask(pos, window, torch.bfloat16)

            def check(fn):
                assert torch.equal(fn(), want)

            fns = {"eager": lambda: build_attention_mask(pos, window, torch.bfloat16),
                   "inductor": lambda: compiled(pos, window, torch.bfloat16),
                   "kunlun": lambda: torch.ops.kunlun.attention_mask(pos, pos, None, True, window or 0,
                                                                     torch.bfloat16, float("-inf"))}
            rows.append(row(f"attention_mask{'_sliding' if window else ''}", T, T * T * 2, bw, fns, check, want))
            print(rows[-1], flush=True)
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = sorted({r["op"] for r in rows})
    cols = min(len(ops), 4)
    nrows = -(-len(ops) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(ops):]:
        ax.set_visible(False)
    for ax, op in zip(axes, ops):
        rs = [r for r in rows if r["op"] == op]
        xs = [r["size"] for r in rs]
        for label in ["eager", "inductor", "kunlun"]:
            # GPU time (CUDA-graph replay) where the variant can be captured, else per call (hollow marks)
            graph = all(r.get(f"{label}_graph_ms") for r in rs)
            ys = [r[f"{label}_graph_ms"] if graph else r[f"{label}_ms"] for r in rs]
            ax.plot(xs, ys, marker="o", fillstyle="full" if graph else "none",
                    label=label + ("" if graph else " (per call)"))
        ax.plot(xs, [r["floor_ms"] for r in rs], marker="o", label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("tokens (T or M)")
        ax.set_ylabel("ms (graph replay)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    bw, tflops = copy_bandwidth_gbps(), matmul_tflops()
    sections = {"add_rmsnorm": lambda: add_rmsnorm_rows(bw), "masked_input": lambda: masked_input_rows(bw),
                "prologue": lambda: prologue_rows(bw), "moe_gate": lambda: moe_gate_rows(bw),
                "fused_moe": lambda: fused_moe_rows(bw), "attention_mask": lambda: attention_mask_rows(bw)}
    rows = [r for name, run in sections.items() if SECTIONS is None or name in SECTIONS for r in run()]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_GBps": bw, "bf16_matmul_TFLOPs": tflops, "rows": rows}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "ops.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result["rows"], os.path.join(OUT, "ops.png"))
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  copy {bw:.0f} GB/s  "
          f"bf16 matmul {tflops:.0f} TFLOP/s")
    print("per call (host dispatch included) | CUDA-graph replay (GPU time); %fl = floor / kunlun graph time")
    print(f"{'op':<26}{'size':>8}{'eager':>9}{'induct':>9}{'kunlun':>9} |{'eager':>8}{'induct':>8}{'kunlun':>8}"
          f"{'floor':>9}{'%fl':>5}  kernels e/i/k")
    for r in result["rows"]:
        g = {k: (f"{r[k + '_graph_ms']:>8.4f}" if r[k + "_graph_ms"] else f"{'-':>8}")
             for k in ("eager", "inductor", "kunlun")}
        frac = r.get("kunlun_graph_frac_of_bw", r["kunlun_frac_of_bw"])
        print(f"{r['op']:<26}{r['size']:>8}{r['eager_ms']:>9.4f}{r['inductor_ms']:>9.4f}{r['kunlun_ms']:>9.4f} |"
              f"{g['eager']}{g['inductor']}{g['kunlun']}{r['floor_ms']:>9.4f}{100 * frac:>4.0f}%  "
              f"{r['eager_kernels']}/{r['inductor_kernels']}/{r['kunlun_kernels']}"
              + (f"  swiglu unfused {r['kunlun_swiglu_flipped_graph_ms'] or 0:.4f}" if "plan" in r else "")
              + ("  matmul {:.0f}/{:.0f} TFLOP/s".format(*r["matmul_TFLOPs_around_row"])
                 if "matmul_TFLOPs_around_row" in r else ""))


if __name__ == "__main__":
    main()
