"""How much the fuzzer's bf16 tolerance rule widens the bound, call by call: for every MoE seed, the old
rule max(2e-2, 3 x eager's error vs float64) beside the current one (adds 2 x the rounding spread).
Eager only (no compile): a property of the generated models, on the CPU in a few minutes.

    python benchmarks/fuzz_tolerance_survey.py [SEEDS=0-199] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import runtime_fuzz as rf  # noqa: E402 - the fuzzer lives with the tests


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("seeds", nargs="?", default="0-199")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    rows = []
    for seed in rf.parse_seeds(a.seeds):
        if rf.draw_spec(seed, torch.bfloat16).ffn != "moe":
            continue
        case = rf.generate(seed, a.device, torch.bfloat16)
        ref = rf.Reference(case)
        rows += [(seed, max(rf.BF16_TOL, 3 * ref.eager_err[c]), ref.tolerance(c)) for c in range(len(case.schedule))]
    old, new = [r[1] for r in rows], [r[2] for r in rows]
    print(f"{len(rows)} calls of {len({r[0] for r in rows})} MoE seeds; median tolerance old "
          f"{statistics.median(old):.3g}, new {statistics.median(new):.3g}; "
          f"widened: {sum(n > o for o, n in zip(old, new))}")
    for bound in (0.02, 0.03, 0.05, 0.1):
        print(f"calls with tolerance > {bound}: old {sum(o > bound for o in old)}, new {sum(n > bound for n in new)}")
    print(f"largest: old {max(old):.3g}, new {max(new):.3g}")


if __name__ == "__main__":
    main()
