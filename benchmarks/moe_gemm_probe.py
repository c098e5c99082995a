"""Where fused_moe's large-path GEMM time goes (GPU): padding, and what a grouped GEMM from the library gets.

usage: python3 benchmarks/moe_gemm_probe.py [OUT_DIR]
At M=8192, E=128, top-8, H=2048, I=768 (bf16), per kernel (profiler, 10 calls):
- the op's own kernels on the model's random routing and on a balanced routing (exactly 512 pairs per
  expert, so no block is padded): the difference is what padding costs;
- `torch._grouped_mm` (PyTorch's grouped GEMM for MoE) on the same GEMMs with rows already compact and
  sorted by expert (no gather, no padding, no epilogue): the rate a library grouped GEMM reaches;
- one dense cuBLAS GEMM of the same flops.
"""
import json
import os
import sys

import torch
import triton

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import fused_moe
from kunlun_compile.ops.moe_plan import plan_fused_moe
from sweep_kernels import kernel_profile

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
dev = "cuda"
E, H, I, k, M = 128, 2048, 768, 8, 8192
P = M * k


def balanced_ids():
    """Every expert gets exactly P / E pairs, each token k distinct experts."""
    base = torch.arange(M, device=dev)[:, None] * k + torch.arange(k, device=dev)[None, :]
    return (base % E).to(torch.int32)


def main():
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    w13 = (torch.randn(E, 2 * I, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device=dev) / I ** 0.5).to(torch.bfloat16)
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    tw, ids = torch.ops.kunlun.moe_gate(torch.randn(M, E, device=dev), k, "softmax", True, 1, 1, None, 1.0)
    plan = plan_fused_moe(M, k, E)
    for name, routing in (("random", ids), ("balanced", balanced_ids())):
        counts = torch.bincount(routing.flatten().long(), minlength=E)
        padded_rows = int(((counts + 127) // 128 * 128).sum())
        kernels = kernel_profile(lambda: fused_moe.triton_impl(x, w13, w2, tw, routing, plan=plan))
        res[f"op {name} routing"] = {"rows": P, "padded_rows": padded_rows, "kernels_ms": kernels}
        gemms = [round(v, 4) for n, v in kernels.items() if "gemm" in n]
        print(f"op, {name} routing: {padded_rows} rows computed for {P} ({padded_rows / P - 1:.1%} padding), "
              f"GEMMs {gemms} ms", flush=True)
    counts = torch.bincount(ids.flatten().long(), minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    real_flops = {"gemm1": 2 * P * 2 * I * H, "gemm2": 2 * P * H * I}
    for name, a, b in (("gemm1", torch.randn(P, H, device=dev, dtype=torch.bfloat16), w13.transpose(1, 2)),
                       ("gemm2", torch.randn(P, I, device=dev, dtype=torch.bfloat16), w2.transpose(1, 2))):
        try:
            out = torch._grouped_mm(a, b, offs=offs)
            e0 = int(counts[0])
            err = ((out[:e0].float() - (a[:e0].float() @ b[0].float())).norm() / out[:e0].float().norm()).item()
            ms = kernel_profile(lambda: torch._grouped_mm(a, b, offs=offs))
            total = sum(ms.values())
            res[f"torch._grouped_mm {name}"] = {"kernels_ms": ms, "ms": total, "err_expert0": err,
                                               "TFLOPs": real_flops[name] / total / 1e9}
            print(f"torch._grouped_mm {name}: {total:.4f} ms = {real_flops[name] / total / 1e9:.0f} TFLOP/s "
                  f"(err {err:.1e}) {ms}", flush=True)
        except Exception as e:  # noqa: BLE001 - recorded: the library may not support it here
            res[f"torch._grouped_mm {name}"] = {"error": repr(e)[:300]}
            print(f"torch._grouped_mm {name}: {e!r}"[:300], flush=True)
        dense_b = b[0].contiguous()
        ms = sum(kernel_profile(lambda: a @ dense_b).values())
        res[f"dense cuBLAS {name}"] = {"ms": ms, "TFLOPs": real_flops[name] / ms / 1e9}
        print(f"dense cuBLAS {name} shape: {ms:.4f} ms = {real_flops[name] / ms / 1e9:.0f} TFLOP/s", flush=True)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "moe_gemm_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
