"""Pattern work per compile: the fusion passes' time on each built-in model, in a fresh process, with an
empty pattern cache (the first compile on a machine) and then with the cache warm (every later process).

Pass times are the passes' own wall-clock timers (report.graphs[0].passes), bf16, 8 tokens, CPU tensors
(the pattern work is host-side); each model runs REPEATS times per cache state and the minimum is kept.

    python benchmarks/pattern_time.py [OUT_DIR] [REPEATS]   -> pattern_time.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

REPEATS = 3
FUSION_PASSES = ("masked_input", "attention_mask", "norm_rope_gate", "moe_gate", "moe_ffn", "add_rmsnorm",
                 "decode_linear")

CHILD = r"""
import json, sys, torch
import kunlun_compile as kc
from kunlun_compile.models import build_model
model, inputs = build_model(sys.argv[1], dtype=torch.bfloat16, device="cpu", num_tokens=8, seed=0)
with torch.no_grad():
    compiled = kc.compile(model, graph_mode="none")
    compiled(*inputs)
g = compiled.kunlun_backend.report.graphs[0]
print(json.dumps({p.name: p.time_ms for p in g.passes}))
"""


def one_run(name: str, cache_dir: str) -> dict:
    env = dict(os.environ, KUNLUN_COMPILE_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD, name], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    from kunlun_compile.models import builtin_names

    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else REPEATS
    rows = []
    only = os.environ.get("PATTERN_TIME_MODELS")  # a comma-separated subset
    for name in [n for n in builtin_names() if not only or n in only.split(",")]:
        row = {"model": name}
        warm = tempfile.mkdtemp()
        one_run(name, warm)  # fills it
        for state in ("empty_cache", "warm_cache"):
            times = []
            for _ in range(repeats):
                if state == "empty_cache":
                    with tempfile.TemporaryDirectory() as d:
                        times.append(one_run(name, d))
                else:
                    times.append(one_run(name, warm))
            row[state] = min(times, key=lambda t: sum(t.get(p, 0) for p in FUSION_PASSES))
            row[f"{state}_fusion_ms"] = round(sum(row[state].get(p, 0) for p in FUSION_PASSES), 1)
        rows.append(row)
        print(f"{name:18} fusion passes: empty cache {row['empty_cache_fusion_ms']:7.1f} ms | warm cache "
              f"{row['warm_cache_fusion_ms']:7.1f} ms", flush=True)
    result = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "repeats": repeats, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "pattern_time.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
