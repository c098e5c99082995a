"""Runs inside the vLLM environment (tests/test_vllm.py builds it): one command per process.

    python driver.py checkpoints OUT              tiny random-weight Qwen3 / Qwen3-MoE checkpoints (float32)
    python driver.py generate MODEL_DIR CONFIG [ENGINE]
                                                  greedy tokens + logprobs + this backend's report, seconds to
                                                  the first token, kunlun warnings, the workers' reports;
                                                  ENGINE: more LLM(...) arguments (tensor_parallel_size)
    python driver.py fusion_pass                  the fusion passes as inductor's post-grad custom pass
    python driver.py unsupported                  selecting "kunlun" on a vLLM lacking a hook: the error

Prints one line `RESULT <json>` on success.
"""
import json
import os
import sys
import time
import warnings

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its report is readable

PROMPTS = [[1, 5, 9, 33, 71, 2, 140, 7], [7, 3, 100, 250, 18], [400, 401, 2, 9, 9, 60, 300]]
MAX_TOKENS = 12
FIRST_TOKEN_PROMPT = [11, 12, 13]  # timed on its own; not one of PROMPTS, so their runs are unchanged
LOGPROBS = 5
COMMON = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
              initializer_range=0.2)  # large weights: every layer moves the logits, so a wrong fusion shows


def checkpoints(out: str) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    dense = Qwen3ForCausalLM(Qwen3Config(intermediate_size=256, **COMMON))
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                             decoder_sparse_step=1, intermediate_size=256, norm_topk_prob=True,
                                             **COMMON))
    paths = {}
    for name, model in (("qwen3", dense), ("qwen3_moe", moe)):
        paths[name] = os.path.join(out, name)
        model.to(torch.float32).save_pretrained(paths[name])
    return paths


def generate(model_dir: str, compilation_config: dict, engine: dict) -> dict:
    from vllm import LLM, SamplingParams

    from kunlun_compile.utils import KunlunCompileWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KunlunCompileWarning)
        start = time.perf_counter()
        # a 64 MiB KV cache holds 4 sequences of 128 tokens many times over; vLLM's default share of the
        # node's memory (GiBs per worker) costs seconds of page faults at every start
        llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", seed=0, max_model_len=128,
                  max_num_seqs=4, kv_cache_memory_bytes=64 << 20, compilation_config=compilation_config, **engine)
        engine_s = time.perf_counter() - start
        llm.generate([{"prompt_token_ids": FIRST_TOKEN_PROMPT}],
                     SamplingParams(temperature=0.0, max_tokens=1, detokenize=False))
        first_token_s = time.perf_counter() - start
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    result = {
        "engine_s": engine_s,  # LLM(...) returned
        "first_token_s": first_token_s,  # ... and one token generated: what a restart costs a user
        "warnings": [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)],
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        # per step, the chosen token's logprob: compared with a tolerance (fusion reorders float sums)
        "logprobs": [[step[tok].logprob for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                     for o in outs],
        "mode": int(llm.llm_engine.vllm_config.compilation_config.mode),
        "backend": llm.llm_engine.vllm_config.compilation_config.backend,
    }
    import kunlun_compile

    # with the fusion pass in vLLM's inductor pipeline the pass holds the report, else the backend
    uses_pass = "inductor_passes" in compilation_config
    report = kunlun_compile.vllm_fusion_pass.report if uses_pass else kunlun_compile.last_report()
    result["report"] = report.summary()
    result["graph_names"] = [g.name for g in report.graphs]
    result["worker_reports"] = worker_reports()
    return result


def worker_reports() -> list:
    """The reports the workers (this process too, without multiprocessing) wrote next to this run's
    vLLM cache, read the way a user reads them (kunlun_compile.vllm.reports)."""
    from kunlun_compile.vllm.reports import find_reports, latest_run

    root = os.environ.get("VLLM_CACHE_ROOT") or os.path.expanduser("~/.cache/vllm")
    found = latest_run(find_reports(os.path.join(root, "torch_compile_cache")))
    return [{k: r.get(k) for k in ("rank", "pid", "path", "summary", "warm_start", "tensor_parallel_size")}
            for r in found]


def fusion_pass() -> dict:
    """The fusion pass as vLLM's inductor pipeline calls it: a post-grad custom pass of inductor."""
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # a cached graph would skip the post-grad passes
    import torch

    from kunlun_compile.vllm.fusion_pass import KunlunFusionPass

    torch.manual_seed(0)
    fusion = KunlunFusionPass()

    def block(x, residual, weight, proj):
        h = x + residual
        variance = h.pow(2).mean(-1, keepdim=True)
        # `proj.T` is a 2-D transpose: our canonical form spells it `aten.t`, which inductor cannot lower
        return ((h * torch.rsqrt(variance + 1e-6)) * weight) @ proj.T, h

    x, residual, weight, proj = torch.randn(8, 64), torch.randn(8, 64), torch.randn(64), torch.randn(32, 64)
    compiled = torch.compile(block, backend="inductor", options={"post_grad_custom_post_pass": fusion})
    got, want = compiled(x, residual, weight, proj), block(x, residual, weight, proj)
    return {"patterns": fusion.report.summary()["patterns"], "graphs": len(fusion.report.graphs),
            "max_abs_err": max(float((g - w).abs().max()) for g, w in zip(got, want)),
            "uuid_changes_with_options": fusion.uuid() != KunlunFusionPass(disable=["moe_ffn"]).uuid()}


def fusion_pass_model() -> dict:
    """The built-in qwen3-tiny in bf16 through plain inductor with the pass: inductor's post-grad graph spells
    casts as `prims.convert_element_type`, and the pass must hand back only what inductor lowers."""
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    import torch

    from kunlun_compile.models import build_model
    from kunlun_compile.vllm.fusion_pass import KunlunFusionPass

    fusion = KunlunFusionPass()
    model, inputs = build_model("qwen3-tiny", dtype=torch.bfloat16, device="cpu", num_tokens=8, seed=0)
    with torch.no_grad():
        want = model(*inputs).double()
        exact = model.double()(*[t.double() if t.is_floating_point() else t for t in inputs])
        model.to(torch.bfloat16)
        got = torch.compile(model, backend="inductor",
                            options={"post_grad_custom_post_pass": fusion})(*inputs).double()
    summary = fusion.report.summary()
    return {"patterns": summary["patterns"], "fallbacks": summary["fallbacks"],
            "rel_err": float((got - exact).norm() / exact.norm()),
            "eager_rel_err": float((want - exact).norm() / exact.norm())}


def unsupported() -> dict:
    """Simulate a vLLM without the compiler hook: the plugin must refuse backend="kunlun" clearly."""
    import vllm.compilation.backends as backends

    del backends.make_compiler
    from kunlun_compile.vllm import plugin

    plugin._installed = False
    plugin.register()
    from vllm.config.compilation import CompilationConfig

    try:
        CompilationConfig(mode=3, backend="kunlun")
    except Exception as e:  # noqa: BLE001 - any refusal is the answer this probe reports
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def main(argv):
    if argv[0] == "checkpoints":
        result = checkpoints(argv[1])
    elif argv[0] == "generate":
        result = generate(argv[1], json.loads(argv[2]), json.loads(argv[3]) if len(argv) > 3 else {})
    elif argv[0] == "fusion_pass":
        result = fusion_pass()
    elif argv[0] == "fusion_pass_model":
        result = fusion_pass_model()
    elif argv[0] == "unsupported":
        result = unsupported()
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
