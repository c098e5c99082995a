"""The HF corpus (tests/corpus) at a decode step with a KV cache: prefill 7 tokens eagerly, then one token through
the compiled model (`kunlun_compile.backend(graph_mode="none")`) with a copy of the cache, against eager's own
decode step.  Per architecture: relative error, families found, fallbacks, KunlunCompileWarnings and the near
misses of the mask and router families (one query: masks with a q dim of size 1).

    python3 benchmarks/decode_step_corpus.py OUT_DIR [fp32|bf16] [ARCH,...]  -> OUT_DIR/decode_step_corpus_{dtype}.json
Set TRITON_INTERPRET=1 to run the kunlun:: kernels interpreted on a CPU machine (else their torch references).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402 - after the path

import kunlun_compile  # noqa: E402 - after the path
from kunlun_compile.utils import KunlunCompileWarning  # noqa: E402 - after the path
from tests.corpus import run as corpus  # noqa: E402 - after the path
from tests.corpus.archs import ARCHS, COUNTED  # noqa: E402 - after the path


def decode_step(arch, dname: str) -> dict:
    row: dict = {"arch": arch.name, "dtype": dname}
    model = corpus.build(arch, corpus.TORCH_DTYPES[dname])
    prompt = corpus.input_ids(arch.ids_seed, (1, 7))
    token = corpus.input_ids(arch.ids_seed + 1, (1, 1))
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        want = model(token, past_key_values=copy.deepcopy(cache), use_cache=True).logits
        torch._dynamo.reset()
        backend = kunlun_compile.backend(graph_mode="none")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.compile(model, backend=backend)(token, past_key_values=cache, use_cache=True).logits
    graphs = backend.report.graphs
    row["rel_err"] = corpus.rel_err(got, want)
    row["within_limit"] = row["rel_err"] <= corpus.LIMITS[dname]
    row["patterns"] = {f: sum(g.patterns.get(f, 0) for g in graphs) for f in COUNTED}
    row["fallbacks"] = [f"{f.graph}/{f.stage}: {f.reason}" for g in graphs for f in g.fallbacks]
    row["near_misses"] = [line for g in graphs for p in g.passes for line in p.near_misses
                          if line.split(":", 1)[0].split("/", 1)[0] in ("attention_mask", "moe_gate")]
    row["warnings"] = [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)]
    torch._dynamo.reset()
    return row


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    dname = sys.argv[2] if len(sys.argv) > 2 else "fp32"
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else None
    result = {**corpus.meta(), "rows": []}
    os.makedirs(out_dir, exist_ok=True)
    for arch in [a for a in ARCHS if only is None or a.name in only]:
        try:
            row = decode_step(arch, dname)
        except Exception as e:  # noqa: BLE001 - a failure is a finding, reported
            row = {"arch": arch.name, "dtype": dname, "error": corpus.short_exc(e)}
        result["rows"].append(row)
        problems = [p for p in (row.get("error"), None if row.get("within_limit") else "over the limit",
                                *row.get("fallbacks", []), *row.get("warnings", [])) if p]
        print(f"{arch.name:16} {dname} err {row.get('rel_err', float('nan')):.1e} "
              f"{'; '.join(problems) if problems else 'OK'} {row.get('near_misses', [])[:2]}", flush=True)
        with open(os.path.join(out_dir, f"decode_step_corpus_{dname}.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
