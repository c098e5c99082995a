"""The HF corpus (tests/corpus) on the GPU: every architecture in fp32 and bf16 with the real Triton kernels,
eager vs `kunlun_compile.backend(graph_mode="none")` on CUDA.  Counts are compared with the registry
(`tests/corpus/archs.py`, read from transformers 5.24's modeling files: the GPU machines may carry another
transformers, whose spellings can differ -- a count that differs is printed, not hidden), and every run is
checked for fallbacks, exceptions and the dtype's error limit.

    python3 benchmarks/hf_corpus_cuda.py OUT_DIR [DEVICE [ARCH,...]]   -> OUT_DIR/hf_corpus_cuda.json, a summary
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402 - after the path

from tests.corpus import run as corpus  # noqa: E402 - after the path
from tests.corpus.archs import ARCHS, COUNTED, DTYPES  # noqa: E402 - after the path


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    rows, t0 = [], time.perf_counter()
    totals = {d: [0, 0] for d in DTYPES}
    for arch in [a for a in ARCHS if only is None or a.name in only]:
        for dname in DTYPES:
            row = corpus.run(arch, dname, device=device)
            rows.append(row)
            want, registry = arch.expected_counts(), arch.found_counts(dname)
            got = {f: row.get("patterns", {}).get(f, 0) for f in COUNTED}
            totals[dname][0] += sum(min(got[f], want[f]) for f in COUNTED)
            totals[dname][1] += sum(want.values())
            problems = [p for p in (row.get("build_error"), row.get("error"),
                                    "over the limit" if "rel_err" in row and not row["within_limit"] else None,
                                    *row.get("fallbacks", [])) if p]
            differs = {f: f"{got[f]}, CPU run finds {registry[f]}" for f in COUNTED if got[f] != registry[f]}
            print(f"{arch.name:16} {dname} err {row.get('rel_err', float('nan')):.1e} "
                  f"{'OK' if not problems else problems} {differs or ''}", flush=True)
    for d, (found, expected) in totals.items():
        print(f"{d}: found {found} / expected {expected} ({100 * found / expected:.1f}%)")
    name = torch.cuda.get_device_name() if device == "cuda" else device
    meta = dict(corpus.meta(), device=name, wall_s=round(time.perf_counter() - t0, 1),
                totals={d: {"found": f, "expected": e} for d, (f, e) in totals.items()})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "hf_corpus_cuda.json"), "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
