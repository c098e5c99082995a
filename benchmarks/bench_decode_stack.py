"""The independently written decode stack (tests/decode_stack.py, GPU config: 4 layers, hidden 2048, 16 q / 2 kv
heads of 128, partial rotary 32, Gemma Q/K norms, sigmoid gate, 16 experts top-8 through `torch._grouped_mm`
over argsort-ed rows with `bincount` offsets, bf16) -- code nobody on the backend wrote -- compiled four ways,
side by side in one run: eager, inductor (default and reduce-overhead), kunlun (its default graph mode), and
kunlun with every fusion off.  Per batch: wall time per call (the stack reads `bincount` back to the host in
every variant, so whole-call CUDA-graph replay is not possible), the kunlun fusions found, and each variant's
error against a float64 copy of the model (its experts as a per-expert loop).

    python benchmarks/bench_decode_stack.py [OUT_DIR]    -> decode_stack.json and .png
    python benchmarks/bench_decode_stack.py --plot JSON   -> the .png again from a JSON (no GPU needed)
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import kunlun_compile as kc  # noqa: E402
from tests import decode_stack as ds  # noqa: E402

BATCHES = (1, 16, 64)
CACHE_LEN = 200


def wall_ms(fn, args, reps=60, warmup=8):
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn(*args)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - want).norm() / want.norm()).item()


def plot(json_path: str) -> None:
    """Each variant's time per batch as a ratio to inductor reduce-overhead, next to the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    rows = data["rows"]
    labels = [k[: -len("_ms")] for k in rows[0] if k.endswith("_ms")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.bar([j + i * width for j in range(len(rows))],
               [r[f"{label}_ms"] / r["inductor_reduce_overhead_ms"] for r in rows], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("time / inductor reduce-overhead")
    ax.set_title(f"decode stack (tests/decode_stack.py), {data['device']}, bf16, wall time per call")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(json_path[: -len(".json")] + ".png", dpi=120)


def main():
    if sys.argv[1:2] == ["--plot"]:
        plot(sys.argv[2])
        return
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    cfg = ds.GPU_CONFIG
    model = ds.build(cfg, "cuda", torch.bfloat16)
    model64 = ds.build(dataclasses.replace(cfg, experts_impl="loop"), "cuda", torch.float64)
    variants = {
        "eager": lambda: model,
        "inductor": lambda: torch.compile(model, backend="inductor"),
        "inductor_reduce_overhead": lambda: torch.compile(model, backend="inductor", mode="reduce-overhead"),
        "kunlun": lambda: kc.compile(model),
        "kunlun_nofusion": lambda: kc.compile(model, fusion=False),
    }
    rows = []
    for batch in BATCHES:
        gen = torch.Generator().manual_seed(batch)
        args = ds.make_inputs(cfg, batch, gen, "cuda", torch.bfloat16, cache_len=CACHE_LEN)
        args64 = (args[0].double(), args[1], [c.double() for c in args[2]])
        with torch.no_grad():
            exact = model64(*args64)
        row = {"batch": batch}
        for label, make in variants.items():
            torch._dynamo.reset()
            fn = make()
            with torch.no_grad():
                got = fn(*args)
            row[f"{label}_rel_err_vs_float64"] = rel_err(got, exact)
            row[f"{label}_ms"] = wall_ms(fn, args)
            if label.startswith("kunlun"):
                found = {}
                for g in fn.kunlun_backend.report.graphs:
                    for name, n in g.patterns.items():
                        found[name] = found.get(name, 0) + n
                row[f"{label}_patterns"] = {k: v for k, v in found.items() if v}
        for label in variants:
            row[f"{label}_vs_inductor_reduce_overhead"] = row[f"{label}_ms"] / row["inductor_reduce_overhead_ms"]
        rows.append(row)
        print(f"batch {batch:3d} | " + " ".join(f"{label} {row[f'{label}_ms']:.3f} ms" for label in variants) +
              f" | kunlun / inductor-ro x{row['kunlun_vs_inductor_reduce_overhead']:.2f}, / inductor "
              f"x{row['kunlun_ms'] / row['inductor_ms']:.2f} | err kunlun {row['kunlun_rel_err_vs_float64']:.1e} "
              f"eager {row['eager_rel_err_vs_float64']:.1e} | {row['kunlun_patterns']}", flush=True)
        os.makedirs(out_dir, exist_ok=True)  # after every batch: a run cut short keeps what it measured
        with open(os.path.join(out_dir, "decode_stack.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "config": dataclasses.asdict(cfg), "cache_len": CACHE_LEN,
                       "rows": rows}, f, indent=1)
    plot(os.path.join(out_dir, "decode_stack.json"))


if __name__ == "__main__":
    main()
