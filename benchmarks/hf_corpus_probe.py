"""The backend's fusions on third-party HF transformers decoders, the real Triton kernels run on CPU.

The architectures are the corpus registry's (tests/corpus/archs.py), each built from a tiny random config
(hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 256, intermediate 128; MoE: 4 experts top-2,
where the architecture's defaults do not say otherwise), in fp32 and bf16, eval mode.  tests/corpus/run.py
compares eager logits on a (2, 7) batch of ids with `torch.compile(model, backend=kunlun_compile.backend(
graph_mode="none"))` (not strict, the user's default), with Triton's interpreter (TRITON_INTERPRET=1) running
the kernels.  Per (arch, dtype): relative error (float64, norm-wise), the patterns found, the fallbacks, the
near misses and any KunlunCompileWarning; then once more with the `views_after_fused_ops` pass disabled (rel.
error, fallbacks, exceptions only).  The expected-vs-found table is `hf_corpus_table.py`'s.

    python3 benchmarks/hf_corpus_probe.py [ARCH ...]   -> results/hf_corpus_cpu_interpreted.json
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402 - after TRITON_INTERPRET is set
import sys  # noqa: E402 - after TRITON_INTERPRET is set
import time  # noqa: E402 - after TRITON_INTERPRET is set

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.corpus import run as corpus  # noqa: E402 - after TRITON_INTERPRET is set
from tests.corpus.archs import ARCHS, DTYPES  # noqa: E402 - after TRITON_INTERPRET is set

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf_corpus_cpu_interpreted.json")
LIMITS = corpus.LIMITS


def probe(arch, dname: str) -> dict:
    """The corpus run, then once more with the `views_after_fused_ops` pass disabled."""
    row = corpus.run(arch, dname)
    if "build_error" in row:
        row["skipped"] = row["build_error"]
        return row
    model, ids, want = corpus.prepare(arch, dname)
    nov = corpus.compiled_run(model, ids, want, disable=("views_after_fused_ops",))
    row["no_views_pass"] = {k: nov[k] for k in ("rel_err", "error", "traceback", "fallbacks", "eager_graphs",
                                                "warnings", "seconds") if k in nov}
    return row


def fmt_err(r: dict) -> str:
    return f"{r['rel_err']:.2e}" if "rel_err" in r else "ERR " + r.get("error", "?")[:60]


def table(rows: list) -> str:
    lines = [f"{'arch':<14} {'dtype':<5} {'rel_err':<10} {'patterns (total: per family)':<66} {'fallbacks':<9} "
             f"{'nm':>3}  no-views-pass"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['arch']:<14} {r['dtype']:<5} SKIPPED: {r['skipped'][:100]}")
            continue
        pats = {k: v for k, v in r["patterns"].items() if v > 0}
        ptxt = f"{sum(pats.values())}: " + ", ".join(f"{k}={v}" for k, v in sorted(pats.items()))
        fb = f"{len(r['fallbacks'])}" + (f" ({r['eager_graphs']}e)" if r["eager_graphs"] else "")
        nv = r["no_views_pass"]
        nvt = fmt_err(nv) + (f" fb={len(nv['fallbacks'])}" if nv.get("fallbacks") else "")
        lines.append(f"{r['arch']:<14} {r['dtype']:<5} {fmt_err(r):<10} {ptxt:<66} {fb:<9} "
                     f"{len(r['near_misses']):>3}  {nvt}")
    return "\n".join(lines)


def flagged(rows: list) -> list:
    out = []
    for r in rows:
        if "skipped" in r:
            continue
        for label, res in (("default", r), ("no-views-pass", r["no_views_pass"])):
            if "error" in res:
                out.append(f"{r['arch']} {r['dtype']} {label}: exception {res['error']}")
            elif res["rel_err"] > LIMITS[r["dtype"]]:
                out.append(f"{r['arch']} {r['dtype']} {label}: rel_err {res['rel_err']:.3e} > {LIMITS[r['dtype']]}")
    return out


def main() -> None:
    only = set(sys.argv[1:])
    t_start = time.perf_counter()
    rows: list = []
    meta = corpus.meta()
    for arch in ARCHS:
        if only and arch.name not in only:
            continue
        name = arch.name
        for dname in DTYPES:
            t0 = time.perf_counter()
            row = probe(arch, dname)
            row["total_seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            status = row.get("skipped") and "skipped" or fmt_err(row)
            print(f"[{time.perf_counter() - t_start:7.1f}s] {name} {dname}: {status} ({row['total_seconds']}s)",
                  flush=True)
            os.makedirs(os.path.dirname(OUT), exist_ok=True)
            with open(OUT, "w") as f:
                json.dump({**meta, "wall_s": round(time.perf_counter() - t_start, 1), "rows": rows}, f, indent=1)
    print()
    print(table(rows))
    skipped = sorted({f"{r['arch']}: {r['skipped']}" for r in rows if "skipped" in r})
    if skipped:
        print("\nskipped:\n  " + "\n  ".join(skipped))
    bad = flagged(rows)
    print("\nover the limit / exceptions:" + ("\n  " + "\n  ".join(bad) if bad else " none"))
    print(f"\nwall time {time.perf_counter() - t_start:.1f}s -> {OUT}")


if __name__ == "__main__":
    main()
