"""End-to-end step latency with the graph runtime, on the GPU: eager, inductor (default and
reduce-overhead) and the kunlun backend in each graph mode, side by side in one process.

Models: the built-in Qwen3-MoE-like and Qwen3-Next-like stacks, 4 layers at the sizes of the
shared anchors (hidden 2048, 16 q / 2 kv heads of 128 (Next: 256, rotary 64, gated), 64 experts
top-8 of 768), bf16; batches of 1, 16 and 64 tokens.  The built-in attention runs over the step's
own tokens (no KV cache), so attention costs less than in a real decode; the weight-read floor is
the same.  Cold compile: seconds from `torch.compile` to the third result (warm-up, capture).

    python benchmarks/bench_runtime.py [OUT_DIR] [MODEL,...]   -> runtime_e2e.json, runtime_e2e.png
    python benchmarks/bench_runtime.py --cold OUT_DIR [MODEL,...] -> compile_cold.json (fresh processes)
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs

SIZES = dict(num_hidden_layers=4, vocab_size=4096, hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
             intermediate_size=6144, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=768,
             max_position_embeddings=4096)
MODELS = {"qwen3-moe-tiny": {},
          "qwen3-next-tiny": dict(head_dim=256, rotary_dim=64, shared_expert_intermediate_size=768)}
BATCHES = tuple(int(b) for b in os.environ.get("BENCH_BATCHES", "1,16,64").split(","))  # a subset: quick checks
KUNLUN_MODES = ("none", "piecewise", "full", "full_and_piecewise")


def copy_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / do_bench(lambda: b.copy_(a)) / 1e6


def weight_floor_ms(model, cfg, tokens: int, gbps: float) -> float:
    """Bytes of weights one step must read (experts: the expected number touched), at copy bandwidth."""
    expert_bytes, other = 0, 0
    for name, p in model.named_parameters():
        if p.dim() == 3 and p.shape[0] == cfg.num_experts:
            expert_bytes += p.numel() * p.element_size()
        elif "embed" not in name:  # the embedding reads `tokens` rows only
            other += p.numel() * p.element_size()
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** tokens)
    return (other + expert_bytes * touched / e) / (gbps * 1e6)


def timed_compile(make, args):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    fn = make()
    for _ in range(3):
        out = fn(*args)
    torch.cuda.synchronize()
    return fn, out, time.perf_counter() - t0


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    gbps = copy_gbps()
    rows = []

    def save(rows):
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "copy_GBps": gbps, "sizes": SIZES, "models": MODELS, "rows": rows}
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "runtime_e2e.json"), "w") as f:
            json.dump(result, f, indent=1)

    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(MODELS)
    for name, extra in ((n, MODELS[n]) for n in only):
        overrides = dict(SIZES, **extra)
        model, _ = build_model(name, dtype=torch.bfloat16, device="cuda", seed=0, **overrides)
        cfg = dataclasses.replace(BUILTIN_CONFIGS[name], **overrides)
        gen = torch.Generator().manual_seed(0)
        for tokens in BATCHES:
            args = make_inputs(cfg, tokens, device="cuda", generator=gen)
            row = {"model": name, "tokens": tokens, "floor_ms": weight_floor_ms(model, cfg, tokens, gbps)}
            with torch.inference_mode():
                want = model(*args)
                row["eager_ms"] = do_bench(lambda: model(*args), rep=100, return_mode="median")
                variants = {f"inductor-{m}": (lambda m=m: torch.compile(model, mode=m, dynamic=False))
                            for m in ("default", "reduce-overhead")}
                for mode in KUNLUN_MODES:
                    variants[f"kunlun-{mode}"] = lambda mode=mode: kc.compile(model, dynamic=True, graph_mode=mode)
                # the replay checker's cost (a debugging mode): a shadow run and copies per replay
                variants["kunlun-piecewise-checked"] = lambda: kc.compile(model, dynamic=True, graph_mode="piecewise",
                                                                          check_replays=True)
                for label, make in variants.items():
                    try:
                        fn, out, secs = timed_compile(make, args)
                        row[f"{label}_compile_s"] = secs
                        row[f"{label}_relerr"] = rel(out, want)
                        row[f"{label}_ms"] = do_bench(lambda: fn(*args), rep=100, return_mode="median")
                        if label.startswith("kunlun"):
                            row[f"{label}_runtime"] = fn.kunlun_backend.report.graphs[-1].runtime.get("counters")
                    except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                        row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if row.get("kunlun-piecewise_ms") and row.get("kunlun-piecewise-checked_ms"):
                row["check_replays_cost_ms"] = row["kunlun-piecewise-checked_ms"] - row["kunlun-piecewise_ms"]
            best = min(row.get(f"kunlun-{m}_ms", float("inf")) for m in KUNLUN_MODES[1:])
            ro = row.get("inductor-reduce-overhead_ms")
            row["kunlun_best_vs_reduce_overhead"] = best / ro if ro else None
            row["kunlun_best_vs_floor"] = best / row["floor_ms"]
            ind_c = row.get("inductor-default_compile_s")
            kun_c = row.get("kunlun-piecewise_compile_s")
            row["compile_kunlun_vs_inductor"] = kun_c / ind_c if ind_c and kun_c else None
            rows.append(row)
            cols = ["eager", "inductor-default", "inductor-reduce-overhead"] + [f"kunlun-{m}" for m in KUNLUN_MODES]
            print(f"{name} T={tokens:3d} floor {row['floor_ms']:.3f} ms | " + " ".join(
                f"{c} {row.get(c + '_ms', float('nan')):.3f}" for c in cols) +
                f" | best/RO {row['kunlun_best_vs_reduce_overhead'] or float('nan'):.2f} best/floor "
                f"{row['kunlun_best_vs_floor']:.1f} | compile kun/ind {row['compile_kunlun_vs_inductor'] or 0:.2f}",
                flush=True)
            for k, v in row.items():
                if k.endswith("_error"):
                    print(f"   {k}: {v}", flush=True)
            save(rows)  # after every row: a run cut short by a time limit keeps what it measured
    try:
        plot(rows, os.path.join(out_dir, "runtime_e2e.png"))
    except ImportError as e:
        print(f"no plot: {e}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["eager", "inductor-default", "inductor-reduce-overhead"] + [f"kunlun-{m}" for m in KUNLUN_MODES]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == name]
        width = 0.8 / (len(labels) + 1)
        for i, label in enumerate(labels + ["floor"]):
            key = "floor_ms" if label == "floor" else f"{label}_ms"
            ax.bar([j + i * width for j in range(len(rs))], [r.get(key, 0) for r in rs], width, label=label)
        ax.set_xticks([j + 0.4 for j in range(len(rs))])
        ax.set_xticklabels([f"{r['tokens']} tokens" for r in rs])
        ax.set_yscale("log")
        ax.set_ylabel("ms per step")
        ax.set_title(f"{name}, 4 layers, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(torch.cuda.get_device_name())
    fig.tight_layout()
    fig.savefig(path, dpi=110)


COLD_VARIANTS = ("inductor-default", "inductor-reduce-overhead", "kunlun-piecewise", "kunlun-full")


def cold_compile_one(name: str, variant: str) -> None:
    """In a fresh process with empty caches: seconds from `torch.compile` to the third result at
    one token (warm-up, capture), printed as JSON for `cold_compile`."""
    overrides = dict(SIZES, **MODELS[name])
    model, _ = build_model(name, dtype=torch.bfloat16, device="cuda", seed=0, **overrides)
    cfg = dataclasses.replace(BUILTIN_CONFIGS[name], **overrides)
    args = make_inputs(cfg, 1, device="cuda", generator=torch.Generator().manual_seed(0))
    backend, mode = variant.split("-", 1)
    with torch.inference_mode():
        want = model(*args)
        torch.cuda.synchronize()
        if backend == "inductor":
            _, out, secs = timed_compile(lambda: torch.compile(model, mode=mode, dynamic=False), args)
            found, fallbacks = None, None
        else:
            fn, out, secs = timed_compile(lambda: kc.compile(model, dynamic=True, graph_mode=mode), args)
            # a pass that failed is skipped for its graph: the compile then times less work (NOTES v36)
            report = fn.kunlun_backend.report
            found = dict(sum((collections.Counter(g.patterns) for g in report.graphs), collections.Counter()))
            fallbacks = [f"{f.graph}/{f.stage}: {f.reason[:200]}" for g in report.graphs for f in g.fallbacks]
    print(json.dumps({"model": name, "variant": variant, "compile_s": secs, "relerr": rel(out, want),
                      "patterns": found, "fallbacks": fallbacks}))


def cold_compile(out_dir: str, names) -> None:
    """Cold compile time of each variant, each in its own process with empty inductor, Triton and
    kunlun caches (in one process the second compile reuses the first's kernels)."""
    import subprocess
    import tempfile

    rows = []
    for name in names:
        for variant in COLD_VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton",
                           KUNLUN_COMPILE_CACHE_DIR=f"{tmp}/kunlun")
                run = subprocess.run([sys.executable, __file__, "--cold-one", name, variant], env=env,
                                     capture_output=True, text=True, timeout=300)
            line = run.stdout.strip().splitlines()[-1] if run.returncode == 0 else None
            row = json.loads(line) if line else {"model": name, "variant": variant, "error": run.stderr[-300:]}
            rows.append(row)
            print(row, flush=True)
            if row.get("fallbacks"):
                print(f"WARNING: {name} {variant} compiled with fallbacks; its time is not the backend's", flush=True)
    for name in names:
        got = {r["variant"]: r.get("compile_s") for r in rows if r["model"] == name}
        ind = got.get("inductor-default")
        for v in ("kunlun-piecewise", "kunlun-full"):
            if ind and got.get(v):
                print(f"{name}: cold compile {v} {got[v]:.1f} s / inductor default {ind:.1f} s = {got[v] / ind:.2f}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compile_cold.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "tokens": 1, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cold-one"]:
        cold_compile_one(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--cold"]:
        cold_compile(sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else list(MODELS))
    else:
        main()
