"""SM clock and power while fused_moe M=8192 runs, against the dense matmul behind its floor (GPU).

usage: python3 benchmarks/moe_clocks.py [OUT_DIR]   -> moe_clocks.json, a table on stdout
Why: CUDA-graph replay of the op reads ~10% above the sum of its kernels' times from a 10-call profile.
If that is the clock dropping under sustained load (power cap), the floor's matmul, timed the same way,
should drop with it.  nvidia-smi samples clocks every 100 ms beside three phases of ~3 s each: the
8192^3 bf16 matmul, the op replayed from a CUDA graph, and the op called 10 times with idle gaps.
Then the ratio the target is stated in (op time / floor at the measured matmul rate) measured the way
bench_ops.py does (do_bench of each), ROUNDS times alternating the two, since one measurement of the
matmul rate moves 683-793 TFLOP/s between runs and machines: the median and the range of the ratios.
"""
import json
import os
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun

OUT = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
ROUNDS = 7


def timed_loop(fn, seconds):
    """Calls per second of `fn` for `seconds`, and ms per call (events around the whole loop)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.time()
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(20):
            fn()
        calls += 20
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def main():
    dev = "cuda"
    E, H, I, k, M = 128, 2048, 768, 8, 8192
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
    def op():
        return torch.ops.kunlun.fused_moe(x, w13, w2, tw, ids, "silu")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    op(), a @ a
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        op()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        op()

    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                                "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
    phases = []

    def phase(name, fn):
        time.sleep(1.0)  # idle between phases, so each starts from the same state
        t0 = time.time()
        ms = fn()
        phases.append({"phase": name, "start": t0, "end": time.time(), "ms_per_call": ms})

    phase("matmul 8192^3 bf16, back to back", lambda: timed_loop(lambda: a @ a, 3.0))
    phase("fused_moe M=8192, graph replay back to back", lambda: timed_loop(graph.replay, 3.0))

    def spaced():
        times = []
        for _ in range(10):
            time.sleep(0.2)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[len(times) // 2]
    phase("fused_moe M=8192, 10 replays 0.2 s apart", spaced)
    time.sleep(0.5)
    sampler.terminate()
    samples = []
    for line in sampler.stdout.read().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            stamp = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
            stamp += float("0." + parts[0].split(".")[1]) if "." in parts[0] else 0.0
            samples.append((stamp, float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            continue
    for p in phases:
        inside = [s for s in samples if p["start"] <= s[0] <= p["end"]]
        if inside:
            p["sm_clock_mhz_median"] = sorted(s[1] for s in inside)[len(inside) // 2]
            p["power_w_median"] = sorted(s[2] for s in inside)[len(inside) // 2]
            p["temperature_c_max"] = max(s[3] for s in inside)
        p["samples"] = len(inside)
    flops = 2 * M * k * 3 * H * I
    rounds = []
    for _ in range(ROUNDS):
        mm = do_bench(lambda: a @ a, warmup=25, rep=200, return_mode="median")
        moe = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        rounds.append({"matmul_ms": mm, "moe_ms": moe, "ratio": moe / (flops * mm / (2 * 8192 ** 3))})
    ratios = sorted(r["ratio"] for r in rounds)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "phases": phases, "matmul_TFLOPs": 2 * 8192 ** 3 / phases[0]["ms_per_call"] / 1e9,
              "moe_floor_ms": flops / (2 * 8192 ** 3 / phases[0]["ms_per_call"]), "rounds": rounds,
              "ratio_median": ratios[len(ratios) // 2], "ratio_min": ratios[0], "ratio_max": ratios[-1]}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "moe_clocks.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}")
    for p in phases:
        print(f"{p['phase']:<46} {p['ms_per_call']:.4f} ms/call  SM {p.get('sm_clock_mhz_median', '-')} MHz  "
              f"{p.get('power_w_median', '-')} W  {p.get('temperature_c_max', '-')} C  ({p['samples']} samples)")
    print(f"matmul {result['matmul_TFLOPs']:.0f} TFLOP/s -> floor {result['moe_floor_ms']:.4f} ms; replay "
          f"{phases[1]['ms_per_call'] / result['moe_floor_ms']:.2f}x, "
          f"spaced {phases[2]['ms_per_call'] / result['moe_floor_ms']:.2f}x")
    for r in rounds:
        print(f"do_bench round: matmul {2 * 8192 ** 3 / r['matmul_ms'] / 1e9:.0f} TFLOP/s, op {r['moe_ms']:.4f} ms "
              f"-> {r['ratio']:.3f}x the floor")
    print(f"ratio over {ROUNDS} alternating rounds: median {result['ratio_median']:.3f}x "
          f"(range {result['ratio_min']:.3f}-{result['ratio_max']:.3f})")


if __name__ == "__main__":
    main()
