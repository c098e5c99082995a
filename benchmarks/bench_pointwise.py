"""Generated element-wise kernels vs eager and inductor, on the GPU (bf16, LLM activation sizes).

Each case is a plain-torch function of the kind the fusion passes leave behind
(SiLU·mul after gate_up, the attention output gate, GELU, residual scaling, the
rotary table).  Variants, in one process: eager (one ATen kernel per op),
inductor (torch.compile default), kunlun (this backend, graph runtime off so
the kernel itself is timed) and kunlun with fast_math.  Per variant: median
time per call (do_bench), GPU time in a CUDA graph, CUDA kernels per call, and
the share of outputs not bit-equal to eager.  Floor: bytes moved / copy bandwidth.

    python benchmarks/bench_pointwise.py [OUT_DIR]   -> pointwise_<device>.json, .png and a table
"""
from __future__ import annotations

import functools
import json
import os
import sys

import torch
import triton

import kunlun_compile as kc
from bench_ops import bench, copy_bandwidth_gbps, graph_ms, kernels

F = torch.nn.functional
dev = "cuda"


def silu_mul(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def sigmoid_gate(o, g):
    return o * torch.sigmoid(g)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def residual_scale(x, r):
    return (x.float() * 0.5 + r.float()).to(x.dtype)


def rotary_table(pos, inv_freq):
    freqs = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)


def cases(T):
    bf = dict(device=dev, dtype=torch.bfloat16)
    H, I = 4096, 4096
    return [
        ("silu_mul", silu_mul, (torch.randn(T, 2 * I, **bf) * 3,), T * 3 * I * 2),
        ("sigmoid_gate", sigmoid_gate, (torch.randn(T, H, **bf), torch.randn(T, H, **bf) * 3), T * 3 * H * 2),
        ("gelu_tanh", gelu_tanh, (torch.randn(T, H, **bf) * 3,), T * 2 * H * 2),
        ("residual_scale", residual_scale, (torch.randn(T, H, **bf), torch.randn(T, H, **bf)), T * 3 * H * 2),
        ("rotary_table", rotary_table, (torch.arange(T, device=dev) + 7,
                                        1.0 / 1e6 ** (torch.arange(0, 128, 2, device=dev).float() / 128)),
         T * (8 + 2 * 128 * 2)),
    ]


def main(out_dir):
    torch.manual_seed(0)
    bw = copy_bandwidth_gbps()
    rows = []
    for T in (16, 8192):
        for name, fn, args, floor_bytes in cases(T):
            variants = {
                "eager": fn,
                "inductor": torch.compile(fn),
                "kunlun": torch.compile(fn, backend=kc.backend(graph_mode="none", strict=True)),
                "kunlun_fast_math": torch.compile(fn, backend=kc.backend(graph_mode="none", strict=True,
                                                                         fast_math=True)),
            }
            want = fn(*args)
            want = want if isinstance(want, tuple) else (want,)
            r = {"case": name, "tokens": T, "floor_ms": floor_bytes / (bw * 1e6)}
            for label, f in variants.items():
                got = f(*args)
                got = got if isinstance(got, tuple) else (got,)
                r[f"{label}_not_bit_equal"] = sum((g != w).float().mean().item() for g, w in zip(got, want)) / len(got)
                r[f"{label}_max_rel"] = max(
                    ((g.float() - w.float()).abs() / w.float().abs().clamp_min(1e-3)).max().item()
                    for g, w in zip(got, want))
                call = functools.partial(f, *args)
                r[f"{label}_ms"] = bench(call)
                r[f"{label}_graph_ms"] = graph_ms(call)
                r[f"{label}_kernels"] = kernels(call)
            r["kunlun_vs_inductor_graph"] = r["kunlun_graph_ms"] / r["inductor_graph_ms"]
            r["kunlun_frac_of_bw"] = r["floor_ms"] / r["kunlun_graph_ms"]
            rows.append(r)
            us = {k: r[f"{k}_graph_ms"] * 1e3 for k in ("eager", "inductor", "kunlun", "kunlun_fast_math")}
            print(f"{name:<15} T={T:<5} floor {r['floor_ms']*1e3:7.1f}us | graph us: eager {us['eager']:7.1f} "
                  f"({r['eager_kernels']} k)  inductor {us['inductor']:7.1f} ({r['inductor_kernels']} k)  "
                  f"kunlun {us['kunlun']:7.1f} ({r['kunlun_kernels']} k)  fast {us['kunlun_fast_math']:7.1f}"
                  f" | kunlun/inductor {r['kunlun_vs_inductor_graph']:.2f}  bw {r['kunlun_frac_of_bw']:.0%} | "
                  "not bit-equal: "
                  f"inductor {r['inductor_not_bit_equal']:.1%} kunlun {r['kunlun_not_bit_equal']:.1%} "
                  f"fast {r['kunlun_fast_math_not_bit_equal']:.1%}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_gbps": bw, "rows": rows}
    tag = "h100" if "H100" in result["device"] else "gpu"
    with open(os.path.join(out_dir, f"pointwise_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(out_dir, f"pointwise_{tag}.png"))


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    big = [r for r in rows if r["tokens"] == 8192]
    labels = [r["case"] for r in big]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for k, v in enumerate(["eager", "inductor", "kunlun", "kunlun_fast_math"]):
        ax.bar([i + k * width for i in range(len(big))], [r["floor_ms"] / r[f"{v}_graph_ms"] for r in big], width,
               label=v)
    ax.set_xticks([i + 1.5 * width for i in range(len(big))], labels)
    ax.set_ylabel("fraction of copy bandwidth (higher is better)")
    ax.set_title(f"element-wise clusters, bf16, 8192 tokens ({torch.cuda.get_device_name()})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
