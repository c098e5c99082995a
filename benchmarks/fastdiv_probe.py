"""How a generated kernel splits its flat index into coordinates, three ways, on the GPU.

`i % n`, `i // n` by a run-time size is a full integer division per element and per dim.  The probe
times the bench_lowering cases whose kernels divide (rank >= 2 spaces: rotary over [T, heads, dim],
causal mask, embedding) with the split as
  div:    rem % size, rem // size                   (codegen v4)
  i64:    (rem * m) >> (31 + l) in int64            (tried: slower, see NOTES)
  umulhi: umulhi(2 * rem, m) >> l in 32 bits        (fastdiv.py)
beside inductor, each form compiled into its own cache directory.

    python benchmarks/fastdiv_probe.py [OUT_JSON]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))

FORMS = {
    "div": lambda d, rem="rem": [f"c{d} = {rem} % size{d}", f"{rem} = {rem} // size{d}"],
    "i64": lambda d, rem="rem": ["if INDEX64:", f"    q{d} = {rem} // size{d}", "else:",
                                 f"    q{d} = (({rem}.to(tl.int64) * (mg{d}.to(tl.int64) & 0xFFFFFFFF))"
                                 f" >> (sh{d} + 31)).to(tl.int32)", f"c{d} = {rem} - q{d} * size{d}", f"{rem} = q{d}"],
}
CASES = [("causal_mask", 4096), ("causal_mask", 64), ("rotary_neox", 8192), ("rotary_neox", 16),
         ("embedding_scaled", 8192), ("embedding_scaled", 16)]


def main():
    import bench_lowering as bl
    from bench_fusion import graph_time_ms
    import kunlun_compile as kc
    from kunlun_compile.lowering import cache, codegen, fastdiv

    forms = dict(FORMS, umulhi=fastdiv.split_lines)
    rows = []
    for name, tokens in CASES:
        fn, make = bl.CASES[name]
        torch.manual_seed(0)
        args = make(tokens, bl.SIZES, "cuda")
        want = fn(*args)
        torch._dynamo.reset()
        row = {"case": name, "tokens": tokens, "inductor_ms": graph_time_ms(torch.compile(fn), args)}
        for form, lines in forms.items():
            codegen.split_lines = lines
            cache.set_default_cache_dir(tempfile.mkdtemp(prefix=f"fastdiv_{form}_"))
            cache._kernels.clear()  # loaded kernels are kept per KIR key in the process
            torch._dynamo.reset()
            f = kc.compile(fn, **bl.KUNLUN_OPTIONS)
            got = f(*args)
            row[f"{form}_exact"] = bool(torch.equal(got.nan_to_num(), want.nan_to_num()))
            row[f"{form}_ms"] = graph_time_ms(f, args)
        codegen.split_lines = fastdiv.split_lines
        rows.append(row)
        print(f"{name:18s} {tokens:5d} inductor {row['inductor_ms']:.4f} | "
              + " ".join(f"{k} {row[k + '_ms']:.4f} ({row[k + '_ms'] / row['inductor_ms']:.2f}x"
                         f"{'' if row[k + '_exact'] else ' WRONG'})" for k in forms), flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else "fastdiv_probe.json"
    with open(out, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
