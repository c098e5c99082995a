"""Tile sweep for generated row kernels (lowering/row_kernel.py), on the GPU.

For a few row shapes (softmax with scale and mask over 1024-wide rows at prefill, log_softmax over a
32000-wide vocabulary row at decode and prefill, RMSNorm over 4096), lowers the subgraph once and
times the one kernel under each (persistent, BLOCK_M, BLOCK_R, num_warps) candidate, beside
inductor: the table says which tile rule to keep.  Times are CUDA-graph replays (bench_fusion).

    python benchmarks/row_tiles.py [OUT_JSON]
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def cases():
    bf = torch.bfloat16
    mask = torch.where(torch.rand(1, 1024, device="cuda") > 0.1, 0.0, -1e4)

    def masked_softmax(s):
        return torch.softmax(s.float() * 0.088 + mask, -1).to(bf)

    def log_softmax(x):
        return torch.log_softmax(x.float(), -1)

    w = torch.randn(4096, device="cuda", dtype=bf)

    def rms(x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(bf) * w

    return [("masked_softmax", masked_softmax, (65536, 1024)), ("masked_softmax", masked_softmax, (512, 1024)),
            ("log_softmax", log_softmax, (1, 32000)), ("log_softmax", log_softmax, (64, 32000)),
            ("log_softmax", log_softmax, (1024, 32000)), ("rms", rms, (1, 4096)), ("rms", rms, (8192, 4096))]


def main():
    from torch.fx.experimental.proxy_tensor import make_fx

    from bench_fusion import graph_time_ms
    from kunlun_compile.config import CompileConfig
    from kunlun_compile.lowering import row_kernel
    from kunlun_compile.passes import PassContext
    from kunlun_compile.passes.lower_elementwise import lower_elementwise

    rows = []
    original = row_kernel.tile_plan
    for name, fn, shape in cases():
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        gm = make_fx(fn)(x)
        lower_elementwise(gm, PassContext(CompileConfig(), "t"))
        gm.recompile()
        want = fn(x)
        torch._dynamo.reset()
        ind = torch.compile(fn)
        ind(x)
        t_ind = graph_time_ms(ind, (x,))
        best = None
        m, r = shape
        # a few candidates per shape (each is a compile; ~1 s): persistent tiles of 1-8 rows, or loops of
        # 2048-8192 elements, at 4-16 warps
        full = triton_next_pow2(r)
        candidates = ([(True, bm, full, w) for bm, w in ((1, 4), (2, 4), (4, 8), (8, 8)) if bm * full <= 65536]
                      if full <= 8192 else [])
        candidates += [(False, 1, br, w) for br, w in itertools.product((2048, 4096, 8192), (4, 8, 16)) if br < r]
        for persistent, bm, br, warps in candidates:
            if bm > max(m, 1):
                continue
            row_kernel.tile_plan = lambda rows, n, p=(persistent, bm, br, warps): p
            try:
                got = gm(x)
                err = (got.float() - want.float()).abs().max().item()
                t = graph_time_ms(gm, (x,))
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row of the table
                rows.append(dict(case=name, shape=shape, tile=[persistent, bm, br, warps], error=str(e)[:120]))
                continue
            finally:
                row_kernel.tile_plan = original
            rows.append(dict(case=name, shape=shape, tile=[persistent, bm, br, warps], ms=t, inductor_ms=t_ind,
                             max_abs_err=err))
            if best is None or t < best[0]:
                best = (t, (persistent, bm, br, warps))
        default = original(m, r)
        row_kernel.tile_plan = original
        t_default = graph_time_ms(gm, (x,))
        print(f"{name:15s} {str(shape):14s} inductor {t_ind:.4f}  default {default} {t_default:.4f}  "
              f"best {best[1]} {best[0]:.4f}", flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else "row_tiles.json"
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if __name__ == "__main__":
    main()
