"""Plot fused_moe M=8192 against its matmul floor under each way of measuring the floor (no GPU needed).

usage: python3 benchmarks/plot_moe_clocks.py   -> benchmarks/results/moe_clocks_h100.png
Left: SM clock and power of the floor's matmul and of the op, back to back (700 W cap) and spaced out
(`moe_clocks.py`, three runs; the spaced phase's power is mostly the idle time between calls).  Right: the op's
time over the floor — with the matmul rate taken in the same state as the op (alternating do_bench rounds:
each round's ratio; back to back), and with the rate measured once at the start of the run, as the anchors
did (bench_ops v13's first measurement).
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUNS = ["moe_clocks_h100_run2.json", "moe_clocks_h100_run3.json", "moe_clocks_h100_run4.json"]
FLOPS = 2 * 8192 * 8 * 3 * 2048 * 768


def main():
    runs = [json.load(open(os.path.join(HERE, name))) for name in RUNS]
    ops = json.load(open(os.path.join(HERE, "ops_h100_fused_moe_v13.json")))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = ["matmul, back to back", "op, back to back", "op, 0.2 s apart"]
    for i, run in enumerate(runs):
        clocks = [p["sm_clock_mhz_median"] for p in run["phases"]]
        left.scatter(range(3), clocks, color="#37a", label="SM clock (MHz)" if i == 0 else None)
        left.scatter(range(3), [p["power_w_median"] for p in run["phases"]], color="#a53", marker="s",
                     label="power (W)" if i == 0 else None)
    left.set_xticks(range(3), labels)
    left.set_ylim(0, 2200)
    left.legend()
    left.set_title("fused_moe M=8192 and the floor's 8192^3 matmul: clock and power")

    row = next(r for r in ops["rows"] if r["size"] == 8192)
    start_floor = FLOPS / (ops["bf16_matmul_TFLOPs"] * 1e9)
    bars = [("alternating rounds\n(each round)", [r["ratio"] for run in runs for r in run["rounds"]]),
            ("back to back\n(700 W cap)", [run["phases"][1]["ms_per_call"] / run["moe_floor_ms"] for run in runs]),
            ("bench_ops, rate\naround the row", [row["kunlun_graph_ms"] / row["floor_ms"]]),
            ("bench_ops, rate at\nthe run's start", [row["kunlun_graph_ms"] / start_floor])]
    for i, (_, ratios) in enumerate(bars):
        right.scatter([i] * len(ratios), ratios, color="#3a7")
    right.axhline(1.6, color="k", linestyle="--", label="target 1.6x")
    right.set_xticks(range(len(bars)), [b[0] for b in bars])
    right.set_ylabel("op time / matmul floor")
    right.set_ylim(1.3, 1.9)
    right.legend()
    right.set_title(f"{ops['device']}, torch {ops['torch']}, triton {ops['triton']}")
    fig.tight_layout()
    out = os.path.join(HERE, "moe_clocks_h100.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
