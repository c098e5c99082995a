"""The backend's fusions on third-party HF transformers decoders, the real Triton kernels run on CPU.

Each architecture is built from a tiny random config (hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16,
vocab 256, intermediate 128; MoE: 4 experts top-2), in fp32 and bf16, eval mode.  Eager logits on a (2, 7)
batch of ids are compared with `torch.compile(model, backend=kunlun_compile.backend(graph_mode="none"))`
(not strict, the user's default), with Triton's interpreter (TRITON_INTERPRET=1) running the kernels.
Per (arch, dtype): relative error (float64, norm-wise), the patterns found, the fallbacks, the near misses
and any KunlunCompileWarning; then once more with the `views_after_fused_ops` pass disabled (rel. error,
fallbacks, exceptions only).

    python3 benchmarks/hf_corpus_probe.py [ARCH ...]   -> results/hf_corpus_cpu_interpreted.json
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402 - after TRITON_INTERPRET is set
import sys  # noqa: E402 - after TRITON_INTERPRET is set
import time  # noqa: E402 - after TRITON_INTERPRET is set
import traceback  # noqa: E402 - after TRITON_INTERPRET is set
import warnings  # noqa: E402 - after TRITON_INTERPRET is set

import torch  # noqa: E402 - after TRITON_INTERPRET is set
import transformers  # noqa: E402 - after TRITON_INTERPRET is set
import triton  # noqa: E402 - after TRITON_INTERPRET is set

import kunlun_compile  # noqa: E402 - after TRITON_INTERPRET is set
from kunlun_compile.utils import KunlunCompileWarning  # noqa: E402 - after TRITON_INTERPRET is set

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf_corpus_cpu_interpreted.json")

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=128)

# (name, config class, model class, extra config options)
ARCHS = [
    ("Llama", "LlamaConfig", "LlamaForCausalLM", {}),
    ("Qwen2", "Qwen2Config", "Qwen2ForCausalLM", {}),
    ("Qwen3", "Qwen3Config", "Qwen3ForCausalLM", {}),
    ("Qwen3Moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, decoder_sparse_step=1, mlp_only_layers=[])),
    ("Mistral", "MistralConfig", "MistralForCausalLM", {}),
    ("Mixtral", "MixtralConfig", "MixtralForCausalLM", MOE),
    ("Gemma", "GemmaConfig", "GemmaForCausalLM", {}),
    ("Gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4)),
    ("Gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(sliding_window=4)),
    ("Phi3", "Phi3Config", "Phi3ForCausalLM", {}),
    ("Olmo2", "Olmo2Config", "Olmo2ForCausalLM", {}),
    ("Granite", "GraniteConfig", "GraniteForCausalLM", {}),
    ("Cohere", "CohereConfig", "CohereForCausalLM", {}),
    ("StableLm", "StableLmConfig", "StableLmForCausalLM", {}),
    ("Glm", "GlmConfig", "GlmForCausalLM", {}),
    ("Olmoe", "OlmoeConfig", "OlmoeForCausalLM", MOE),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LIMITS = {"fp32": 1e-4, "bf16": 3e-2}


def build(cfg_name: str, model_name: str, extra: dict, dtype: torch.dtype):
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg)
    return model.to(dtype).eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def short_exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def compiled_run(model, ids, want, **options) -> dict:
    """Compile with a fresh backend, run, and read its report."""
    torch._dynamo.reset()
    be = kunlun_compile.backend(graph_mode="none", **options)
    row: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                got = torch.compile(model, backend=be)(ids).logits
            row["rel_err"] = rel_err(got, want)
        except Exception as e:  # noqa: BLE001 - a probe: whatever the backend raises is a finding
            row["error"] = short_exc(e)
            row["traceback"] = traceback.format_exc()[-4000:]
        row["seconds"] = round(time.perf_counter() - t0, 2)
    graphs = be.report.graphs
    patterns: dict = {}
    for g in graphs:
        for fam, n in g.patterns.items():
            patterns[fam] = patterns.get(fam, 0) + n
    row["graphs"] = len(graphs)
    row["patterns"] = patterns
    row["fallbacks"] = [f"{f.graph}/{f.stage}: {f.reason}" for g in graphs for f in g.fallbacks]
    row["eager_graphs"] = sum(1 for g in graphs if str(g.mode).startswith("eager"))
    row["near_misses"] = [nm for g in graphs for p in g.passes for nm in p.near_misses]
    row["warnings"] = [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)]
    torch._dynamo.reset()
    return row


def probe(name: str, cfg_name: str, model_name: str, extra: dict, dname: str) -> dict:
    row: dict = {"arch": name, "dtype": dname}
    try:
        model = build(cfg_name, model_name, extra, DTYPES[dname])
    except Exception as e:  # noqa: BLE001 - an architecture that will not build is skipped, with its reason
        row["skipped"] = short_exc(e)
        return row
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    row.update(compiled_run(model, ids, want))
    nov = compiled_run(model, ids, want, disable=("views_after_fused_ops",))
    row["no_views_pass"] = {k: nov[k] for k in ("rel_err", "error", "traceback", "fallbacks", "eager_graphs",
                                                "warnings", "seconds") if k in nov}
    return row


def fmt_err(r: dict) -> str:
    return f"{r['rel_err']:.2e}" if "rel_err" in r else "ERR " + r.get("error", "?")[:60]


def table(rows: list) -> str:
    lines = [f"{'arch':<9} {'dtype':<5} {'rel_err':<10} {'patterns (total: per family)':<66} {'fallbacks':<9} "
             f"{'nm':>3}  no-views-pass"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['arch']:<9} {r['dtype']:<5} SKIPPED: {r['skipped'][:100]}")
            continue
        pats = {k: v for k, v in r["patterns"].items() if v > 0}
        ptxt = f"{sum(pats.values())}: " + ", ".join(f"{k}={v}" for k, v in sorted(pats.items()))
        fb = f"{len(r['fallbacks'])}" + (f" ({r['eager_graphs']}e)" if r["eager_graphs"] else "")
        nv = r["no_views_pass"]
        nvt = fmt_err(nv) + (f" fb={len(nv['fallbacks'])}" if nv.get("fallbacks") else "")
        lines.append(f"{r['arch']:<9} {r['dtype']:<5} {fmt_err(r):<10} {ptxt:<66} {fb:<9} "
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
    meta = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "kunlun_compile": kunlun_compile.__version__, "TRITON_INTERPRET": os.environ["TRITON_INTERPRET"],
            "config": {**COMMON, "moe": MOE}, "ids": "torch.randint(0, 256, (2, 7), seed 1)"}
    for name, cfg_name, model_name, extra in ARCHS:
        if only and name not in only:
            continue
        for dname in DTYPES:
            t0 = time.perf_counter()
            row = probe(name, cfg_name, model_name, extra, dname)
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
