"""Where cold compile time goes: one variant of `bench_runtime.py --cold`, in a fresh process with
empty inductor / Triton / kunlun caches, with wall-clock timers on the phases (cProfile is not used:
under Dynamo's frame hook its cumulative times are wrong).

Phases: each of the three calls (the first holds Dynamo, AOT tracing, the passes, the warm-up run
and its Triton JIT; the second the capture), Triton compiles in this process (count, seconds),
pattern tracing, the kunlun backend's own compile time (passes + runtime build), Dynamo's own
metrics.

    python benchmarks/profile_compile.py OUT_DIR [MODEL] [VARIANT ...]
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Timer:
    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def child(model_name: str, variant: str) -> None:
    sys.path.insert(0, HERE)
    import torch
    import triton.compiler

    import kunlun_compile as kc
    from bench_runtime import BUILTIN_CONFIGS, MODELS, SIZES, build_model, make_inputs
    from kunlun_compile.passes import pattern_engine

    import threading

    triton_timer, pattern_timer = Timer(), Timer()
    in_workers = []  # compiles off the main thread: runtime/precompile.py's parallel ones
    real_compile = triton.compiler.compile

    def compile_noting_thread(*a, **k):
        if threading.current_thread() is not threading.main_thread():
            in_workers.append(1)
        return real_compile(*a, **k)
    triton.compiler.compile = triton_timer.wrap(compile_noting_thread)  # what JITFunction imports lazily
    pattern_engine.compile_rewrite = pattern_timer.wrap(pattern_engine.compile_rewrite)

    overrides = dict(SIZES, **MODELS[model_name])
    model, _ = build_model(model_name, dtype=torch.bfloat16, device="cuda", seed=0, **overrides)
    cfg = dataclasses.replace(BUILTIN_CONFIGS[model_name], **overrides)
    args = make_inputs(cfg, 1, device="cuda", generator=torch.Generator().manual_seed(0))
    backend, mode = variant.split("-", 1)
    mode = mode.removesuffix("-serial")  # -serial: KUNLUN_COMPILE_JIT_WORKERS=1 (set by run_fresh)
    calls = []
    with torch.inference_mode():
        model(*args)
        torch.cuda.synchronize()
        torch._dynamo.reset()
        t_start = time.perf_counter()
        if backend == "inductor":
            fn = torch.compile(model, mode=mode, dynamic=False)
        else:
            fn = kc.compile(model, dynamic=True, graph_mode=mode)
        for _ in range(3):
            t0 = time.perf_counter()
            fn(*args)
            torch.cuda.synchronize()
            calls.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_start
    row = {"model": model_name, "variant": variant, "compile_s": total, "calls_s": calls,
           "triton_compiles": triton_timer.calls, "triton_compiles_in_parallel": len(in_workers),
           "triton_compile_s_summed_over_threads": triton_timer.seconds,
           "pattern_traces": pattern_timer.calls, "pattern_trace_s": pattern_timer.seconds}
    if backend == "kunlun":
        graphs = fn.kunlun_backend.report.graphs
        row["kunlun_backend_s"] = sum(g.compile_ms for g in graphs) / 1e3
        row["kunlun_passes_s"] = {p.name: round(sum(q.time_ms for g in graphs for q in g.passes if q.name == p.name)
                                                / 1e3, 3) for p in graphs[0].passes} if graphs else {}
    metrics = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    row["dynamo_metrics_s"] = {k: round(sum(v), 3) for k, v in metrics.items() if sum(v) > 0.05}
    print(json.dumps(row))


def run_fresh(model: str, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton",
                   KUNLUN_COMPILE_CACHE_DIR=f"{tmp}/kunlun")
        if variant.endswith("-serial"):  # the fused kernels compiled at their launches, one by one
            env["KUNLUN_COMPILE_JIT_WORKERS"] = "1"
        run = subprocess.run([sys.executable, __file__, "--child", model, variant], env=env,
                             capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        return {"model": model, "variant": variant, "error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    out_dir = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else "qwen3-next-tiny"
    variants = sys.argv[3:] or ["kunlun-full", "inductor-default"]
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for variant in variants:
        row = run_fresh(model, variant)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    import torch
    import triton

    with open(os.path.join(out_dir, f"compile_profile_{model}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
