"""The HF corpus (tests/corpus) as a table: architecture x family, expected (from the modeling code, the
registry `tests/corpus/archs.py`) against found in fp32 and bf16, and for each miss the backend's near miss
naming the family or the registry's reason for a silent one.  Runs every architecture in both dtypes
(`tests/corpus/run.py`: eager vs `kunlun_compile.backend(graph_mode="none")`, Triton kernels interpreted)
and writes the run's JSON next to the table.

    python3 benchmarks/hf_corpus_table.py [ARCH ...]   -> results/hf_corpus_table.md, results/hf_corpus_run.json
    python3 benchmarks/hf_corpus_table.py --from-json  -> the table again from results/hf_corpus_run.json
    python3 benchmarks/hf_corpus_table.py --rerun ARCH ...  -> those architectures run again, their rows
                                                               replaced in the JSON (named under "rerun")
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run interpreted on the CPU

import json  # noqa: E402 - after TRITON_INTERPRET is set
import sys  # noqa: E402 - after TRITON_INTERPRET is set
import time  # noqa: E402 - after TRITON_INTERPRET is set
from typing import Dict, List  # noqa: E402 - after TRITON_INTERPRET is set

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.corpus import run as corpus  # noqa: E402 - after TRITON_INTERPRET is set
from tests.corpus.archs import ARCHS, COUNTED, DTYPES, LAYER_FAMILIES, Arch  # noqa: E402 - after TRITON_INTERPRET

HERE = os.path.dirname(os.path.abspath(__file__))
JSON_OUT = os.path.join(HERE, "results", "hf_corpus_run.json")
OUT = os.path.join(HERE, "results", "hf_corpus_table.md")


def found_in(row: dict) -> Dict[str, int]:
    return {f: row.get("patterns", {}).get(f, 0) for f in COUNTED}


def miss_reason(arch: Arch, row: dict, family: str) -> str:
    lines = corpus.near_misses_of(row, family)
    if lines:
        return "near miss: " + lines[0].replace("|", "/")
    why = arch.silent_misses.get(family)
    return f"silent (recorded): {why}" if why else "silent, NOT recorded in the registry"


def _cell(arch: Arch, by_dtype: Dict[str, dict], family: str) -> str:
    want = arch.expected_counts()[family]
    got = [str(found_in(by_dtype[d])[family]) if d in by_dtype and "patterns" in by_dtype[d] else "-"
           for d in DTYPES]
    if want == 0 and all(g == "0" for g in got):
        return "-"  # no such layer: no MoE, or LayerNorm instead of RMSNorm
    text = " / ".join(got)
    return text if all(g == str(want) for g in got) else f"{text} of {want}"


def _err(row: dict) -> str:
    if "build_error" in row or "error" in row:
        return "ERR"
    return f"{row['rel_err']:.1e}" + ("" if row["within_limit"] else " (over)")


def table(rows: List[dict]) -> str:
    by_arch: Dict[str, Dict[str, dict]] = {}
    for r in rows:
        by_arch.setdefault(r["arch"], {})[r["dtype"]] = r
    archs = [a for a in ARCHS if a.name in by_arch]
    head = "| architecture | " + " | ".join(LAYER_FAMILIES) + " | fallbacks | rel. err fp32 / bf16 | forms |"
    lines = [head, "|" + "---|" * (len(LAYER_FAMILIES) + 4)]
    totals = {d: [0, 0, 0] for d in DTYPES}  # found (at most expected), expected, found beyond expected
    misses, extra, drift = [], [], []
    for a in archs:
        rows_a = by_arch[a.name]
        want = a.expected_counts()
        for d, r in rows_a.items():
            got = found_in(r)
            totals[d][0] += sum(min(got[f], want[f]) for f in COUNTED)
            totals[d][1] += sum(want.values())
            totals[d][2] += sum(max(got[f] - want[f], 0) for f in COUNTED)
            if got != a.found_counts(d):
                drift.append(f"{a.name} {d}: found {got}, the registry says {a.found_counts(d)}")
        for f in COUNTED:  # one line per (family, reason), the dtypes it holds for named
            reasons: Dict[str, List[str]] = {}
            for d, r in rows_a.items():
                g = found_in(r)[f]
                if g < want[f]:
                    reasons.setdefault(f"{g} of {want[f]}; {miss_reason(a, r, f)}", []).append(d)
                elif g > want[f]:
                    extra.append(f"{a.name} {d} {f}: {g} found, {want[f]} expected")
            misses += [f"- **{a.name}** {'+'.join(ds)} `{f}` {why}" for why, ds in reasons.items()]
        fallbacks = sum(len(r.get("fallbacks", ())) for r in rows_a.values())
        errs = " / ".join(_err(rows_a[d]) if d in rows_a else "-" for d in DTYPES)
        lines.append(f"| {a.name} | " + " | ".join(_cell(a, rows_a, f) for f in LAYER_FAMILIES) +
                     f" | {fallbacks} | {errs} | {', '.join(a.forms)} |")
    total = ", ".join(f"{d} {t[0]} / {t[1]}" + (f" (+{t[2]} beyond expected)" if t[2] else "")
                      for d, t in totals.items())
    parts = ["\n".join(lines), f"**Found / expected: {total}.**",
             "Misses (the backend's first near miss naming the family, or why none does):\n\n" + "\n".join(misses)]
    if extra:
        parts.append("Found beyond expected (Q/K norms fused as lone norms where the prologue missed them):\n\n"
                     + "\n".join(f"- {e}" for e in extra))
    if drift:
        parts.append("**Differs from the registry's `found` table** (tests/test_corpus.py fails on these):\n\n"
                     + "\n".join(f"- {e}" for e in drift))
    return "\n\n".join(parts)


def run_all(only: set) -> dict:
    t_start = time.perf_counter()
    data = {**corpus.meta(), "rows": []}
    for a in ARCHS:
        if only and a.name not in only:
            continue
        for d in DTYPES:
            row = corpus.run(a, d)
            data["rows"].append(row)
            status = row.get("build_error") or row.get("error") or f"{row['rel_err']:.2e}"
            print(f"[{time.perf_counter() - t_start:7.1f}s] {a.name} {d}: {status} ({row.get('total_seconds')}s)",
                  flush=True)
    data["wall_s"] = round(time.perf_counter() - t_start, 1)
    return data


def main() -> None:
    args = sys.argv[1:]
    if args == ["--from-json"]:
        with open(JSON_OUT) as f:
            data = json.load(f)
    elif args[:1] == ["--rerun"]:
        with open(JSON_OUT) as f:
            data = json.load(f)
        fresh = run_all(set(args[1:]))
        keep = [r for r in data["rows"] if r["arch"] not in args[1:]]
        order = {a.name: i for i, a in enumerate(ARCHS)}
        data["rows"] = sorted(keep + fresh["rows"], key=lambda r: (order[r["arch"]], DTYPES.index(r["dtype"])))
        data["rerun"] = sorted(set(data.get("rerun", [])) | set(args[1:]))
        with open(JSON_OUT, "w") as f:
            json.dump(data, f, indent=1)
    else:
        data = run_all(set(args))
        os.makedirs(os.path.dirname(JSON_OUT), exist_ok=True)
        with open(JSON_OUT, "w") as f:
            json.dump(data, f, indent=1)
    rerun = f", then {', '.join(data['rerun'])} again on later code" if data.get("rerun") else ""
    text = (f"# HF corpus: fusions per architecture (fp32 / bf16)\n\nGenerated by `benchmarks/hf_corpus_table.py` "
            f"from `{os.path.basename(JSON_OUT)}` (transformers {data['transformers']}, torch {data['torch']}, "
            f"Triton kernels {'interpreted on the CPU' if data['interpreted'] else 'not run (torch references)'}; "
            f"tiny random configs, 2 layers; {len(data['rows'])} runs in {data['wall_s']} s{rerun}).  A cell is "
            "the count found in fp32 / bf16, followed by `of N` where that is not the expected N (read from the "
            "modeling code: `tests/corpus/archs.py`, where each count says what it comes from); `-`: none "
            "expected, none found (no MoE; LayerNorm instead of RMSNorm).  The totals count a cell up to its "
            "expected number at most.\n\n" + table(data["rows"]) + "\n")
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
