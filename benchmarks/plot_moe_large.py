"""Plot fused_moe's large path at M=8192 from committed results (no GPU needed).

usage: python3 benchmarks/plot_moe_large.py   -> benchmarks/results/moe_large_h100.png
Left: the v12 sweep (one run, graph replay) — each plan variant's time against the matmul floor of that
run.  Right: the per-kernel GEMM times of `moe_gemm_probe.py` — the op on the model's routing and on a
balanced one (no padding), PyTorch's grouped GEMM and dense cuBLAS on the same flops.
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    sweep = json.load(open(os.path.join(HERE, "sweep_h100_v12_moe_tails.json")))
    probe = json.load(open(os.path.join(HERE, "moe_gemm_probe_h100.json")))
    tflops = sweep["bf16_matmul_TFLOPs"]
    floor = 2 * 8192 * 8 * 3 * 2048 * 768 / (tflops * 1e9)
    rows = [(k.split(" ")[-1] + " group " + k.split(" ")[5][1:], v["ms"]) for k, v in sweep.items()
            if k.startswith("moe M=8192") and isinstance(v, dict) and v.get("ms")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    left.barh([r[0] for r in rows], [r[1] for r in rows], color=["#999" if "tail0" in r[0] else "#3a7" for r in rows])
    for target, style in ((floor, "-"), (1.6 * floor, "--")):
        left.axvline(target, color="k", linestyle=style)
    left.set_xlabel(f"ms (solid: matmul floor {floor:.3f} ms at {tflops:.0f} TFLOP/s; dashed: 1.6x target)")
    left.set_title("fused_moe M=8192, E=128, top-8, H=2048, I=768 (H100, graph replay)")
    bars = []
    for name in ("op random routing", "op balanced routing"):
        gemms = [v for k, v in probe[name]["kernels_ms"].items() if "gemm" in k]
        bars.append((name.replace("op ", "op, "), sum(gemms)))
    for name in ("torch._grouped_mm gemm1", "torch._grouped_mm gemm2", "dense cuBLAS gemm1", "dense cuBLAS gemm2"):
        bars.append((name, probe[name]["ms"]))
    lib = [("torch._grouped_mm GEMM1+2", bars[2][1] + bars[3][1]), ("dense cuBLAS GEMM1+2", bars[4][1] + bars[5][1])]
    bars = bars[:2] + lib
    right.barh([b[0] for b in bars], [b[1] for b in bars], color=["#3a7", "#7c9", "#69c", "#999"])
    right.set_xlabel("ms, both GEMMs (profiler, 10 calls)")
    right.set_title("GEMM time: padding and library rates (moe_gemm_probe)")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "moe_large_h100.png"), dpi=110)


if __name__ == "__main__":
    main()
