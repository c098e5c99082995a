"""One-off probe (NOTES v23): the causal-mask kernel at 4096 tokens, ours vs inductor's.  Prints inductor's
Triton source for the case and the memory / integer-division instruction counts of both PTX listings, so the
1.14x can be explained from the code rather than guessed.

    TORCHINDUCTOR_CACHE_DIR=$OUT/ind TRITON_CACHE_DIR=$OUT/tri python benchmarks/mask_probe.py
"""
from __future__ import annotations

import glob
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_lowering as B  # noqa: E402

import kunlun_compile as kc  # noqa: E402


def counts(ptx: str) -> dict:
    keys = {"ld.global": r"ld\.global", "ld.global.v": r"ld\.global(\.[\w:]+)*\.v\d", "st.global": r"st\.global",
            "st.global.v": r"st\.global(\.[\w:]+)*\.v\d", "div/rem": r"\b(div|rem)\.(s|u)", "mul.hi": r"mul\.hi"}
    return {k: len(re.findall(p, ptx)) for k, p in keys.items()}


def main():
    fn, make = B.CASES["causal_mask"]
    args = make(4096, B.SIZES, "cuda")
    torch.compile(fn)(*args)
    ind_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    for path in glob.glob(f"{ind_dir}/**/*.py", recursive=True):
        text = open(path).read()
        if "@triton.jit" in text and "def triton_" in text:
            print("=== inductor source", path)
            print(text[text.index("@triton"):][:2500])
    torch._dynamo.reset()
    compiled = kc.compile(fn, fusion=False, graph_mode="none")
    compiled(*args)
    torch.cuda.synchronize()
    tri = os.environ.get("TRITON_CACHE_DIR", "")
    for path in sorted(glob.glob(f"{tri}/**/*.ptx", recursive=True)):
        ptx = open(path).read()
        print("===", os.path.basename(path), counts(ptx))
        if "kernel_cuda" in path:
            print(ptx[ptx.index(".entry"):][:3500])


if __name__ == "__main__":
    main()
