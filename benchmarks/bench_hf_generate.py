"""HF `generate()` time on the GPU: eager, inductor and the kunlun backend side by side, one process.

As a user writes it: `model.forward = torch.compile(model.forward, backend=...)`, then greedy
`generate()` of NEW_TOKENS tokens from a 16-token prompt; Qwen3 and Qwen3-MoE with random weights,
4 layers, hidden 1024, bf16; dynamic and static KV cache (`disable_compile=True`, else generate()
compiles a static-cache forward with inductor by itself).  Each variant: two untimed generates
(compiles, captures), then the median of REPS timed ones.  Tokens are compared with eager's.

    python benchmarks/bench_hf_generate.py [OUT_DIR]   -> hf_generate.json
    HF_GENERATE_MODELS=qwen3 python benchmarks/bench_hf_generate.py OUT_DIR   (one model's rows only)
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import triton
import transformers

import kunlun_compile as kc

NEW_TOKENS = 32
REPS = 5
COMMON = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              head_dim=128, max_position_embeddings=512)


def build(kind: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=3072, **COMMON))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=384, num_experts=32, num_experts_per_tok=4,
                                                   decoder_sparse_step=1, intermediate_size=3072, **COMMON))
    return model.to("cuda", torch.bfloat16).eval()


def time_generate(model, ids, kwargs):
    with torch.no_grad():
        for _ in range(2):
            out = model.generate(ids, **kwargs)
        times = []
        for _ in range(REPS):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def parting(model, want, got) -> dict:
    """Where greedy tokens part from eager's, and eager's own logit gap there: eager's logits after the
    shared prefix, the gap between eager's token and the compiled run's token, in bf16 ulps of the top
    logit.  A gap of a few ulps is a tie that rounding decides; a wide one would be a wrong result."""
    differ = (got[0] != want[0]).nonzero()
    if not len(differ):
        return {"parts_at": None}
    i = int(differ[0])
    with torch.no_grad():
        logits = model(want[:, :i]).logits[0, -1].float()
    top = logits[want[0, i]]
    ulp = torch.finfo(torch.bfloat16).eps * max(abs(float(top)), 1e-3)
    gap = float(top - logits[got[0, i]])
    return {"parts_at": i, "eager_gap": gap, "eager_gap_ulps": gap / ulp}


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    rows = []
    ids = torch.randint(0, COMMON["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1)).cuda()
    kinds = os.environ.get("HF_GENERATE_MODELS", "qwen3,qwen3_moe").split(",")  # a subset, to repeat a row
    for kind in kinds:
        for cache in ("dynamic", "static"):
            kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, disable_compile=True,
                          cache_implementation="static" if cache == "static" else None)
            row = {"model": kind, "cache": cache}
            model = build(kind)
            original = model.forward
            want, row["eager_s"] = time_generate(model, ids, kwargs)
            for label, backend in (("inductor", "inductor"), ("kunlun", None)):
                torch._dynamo.reset()
                be = kc.backend() if backend is None else backend
                model.forward = torch.compile(original, backend=be)
                try:
                    t0 = time.perf_counter()
                    got, row[f"{label}_s"] = time_generate(model, ids, kwargs)
                    row[f"{label}_first_two_s"] = time.perf_counter() - t0 - REPS * row[f"{label}_s"]
                    n = ids.shape[1]  # the prompt is shared by construction
                    row[f"{label}_new_tokens_equal_eager"] = float((got[:, n:] == want[:, n:]).float().mean())
                    model.forward = original
                    row[f"{label}_parting"] = parting(model, want, got)
                    if backend is None:
                        counters = {}
                        for g in be.report.graphs:
                            for k, v in (g.runtime.get("counters") or {}).items():
                                counters[k] = counters.get(k, 0) + v
                        row["kunlun_counters"] = counters
                        row["kunlun_fallbacks"] = [f.reason[:200] for g in be.report.graphs for f in g.fallbacks]
                        row["kunlun_capture_failures"] = [c for g in be.report.graphs
                                                          for c in g.runtime.get("capture_failures", [])]
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, not fatal
                    row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                model.forward = original
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "new_tokens": NEW_TOKENS, "config": COMMON, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "hf_generate.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        nan = float("nan")
        print(f"{r['model']:10s} {r['cache']:8s} eager {r['eager_s']:.3f} s | inductor {r.get('inductor_s', nan):.3f}"
              f" | kunlun {r.get('kunlun_s', nan):.3f} s "
              f"(new tokens = eager: {r.get('kunlun_new_tokens_equal_eager')});"
              f" parting inductor {r.get('inductor_parting')} kunlun {r.get('kunlun_parting')}")


if __name__ == "__main__":
    main()
