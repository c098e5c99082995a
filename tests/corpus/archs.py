"""The HF transformers part of the third-party model corpus: decoder architectures built from tiny random
configs (transformers' defaults otherwise: default experts implementation, default attention), with the
fusions each one should get and the ones the backend finds today.

`expected` is read from the modeling file (transformers 5.24, `models/<arch>/modeling_<arch>.py`) for the
2-layer config, one count per pattern family (a family left out expects 0):

- norm_rope_gate: one per attention layer that applies rotary embeddings to q and k.  Q/K RMSNorms that
  come *before* the rotary (Qwen3, Gemma3, Exaone4, ...) belong to it and are not counted again below;
  ones that come after it (HunYuan, Llama4) cannot be taken by a norm-then-rotate op and count as lone
  RMSNorms.
- add_rmsnorm: every RMSNorm application -- after a residual add (fused_add_rmsnorm) or on its own
  (rms_norm: the first layer's input norm, post-norms, MLA's LoRA norms, full-width Q/K norms) -- plus the
  final norm.  The convention of `benchmarks/results/hf_corpus_table.md` before this registry: "every RMSNorm,
  fused ones plus any rsqrt left in the graph".  A LayerNorm (mean subtracted) is no RMSNorm: those
  architectures expect 0 here, whatever rsqrt near misses the backend prints for them.
- moe_gate / moe_ffn: one router and one routed-expert FFN per MoE layer (shared experts are dense MLPs,
  not counted).
- attention_mask: one per mask transformers builds in the graph.  The ids go in without padding, so sdpa's
  plain causal mask is skipped (`is_causal`); a sliding-window mask cannot be, and eager-attention models
  (Gemma2's soft-capping, GptOss's sinks) build their full causal mask too.

`found[dtype]` overrides `expected` where the backend finds another count today; the test holds the
backend to `found` exactly, so a change that finds more or less must update it consciously.  A family
missed (found < expected) must have a near miss naming it in the report, unless it is listed in
`silent_misses` (family -> why no line names it; none today), which the test holds silent until it is fixed.
`found > expected` happens where a prologue is missed and its Q/K norms are fused as lone norms instead.

`ids_seed`: with the common ids (seed 1) a bf16 router of GptOss sits exactly on a top-k tie (two experts'
logits equal for one token in layer 1), those of Dots1, Llama4 and Qwen3Next within a bf16 step of one; any
rounding difference upstream (the interpreted kernels round bf16 their own way) then flips that token's
experts and its logits move by 10-30% (the other tokens stay at ~1e-2), far past the bf16 limit.  Those
architectures draw other ids: their smallest top-k logit margin (over tokens and routers) is 5.6e-3 (Qwen3Next)
to 1.1e-2, against 0 to 2e-3 with seed 1.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Tuple

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=128)
# DeepSeek MLA sizes: key/value heads = query heads (MLA expands one latent per head), q LoRA on
MLA = dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
           v_head_dim=16, n_routed_experts=4)

LAYER_FAMILIES = ("norm_rope_gate", "add_rmsnorm", "moe_gate", "moe_ffn")  # the table's columns
# every family the test compares exactly: all fusion families but decode_linear (a linear's kernel is a
# size decision, "cuBLAS is the kernel at this size" at these tiny shapes, not a pattern question)
COUNTED = ("masked_input", "attention_mask") + LAYER_FAMILIES
DTYPES = ("fp32", "bf16")


def both(**counts: int) -> Dict[str, Dict[str, int]]:
    """The same `found` override in fp32 and bf16."""
    return {d: dict(counts) for d in DTYPES}


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    options: Mapping = dataclasses.field(default_factory=dict)  # over COMMON
    expected: Mapping[str, int] = dataclasses.field(default_factory=dict)
    found: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)  # dtype -> overrides
    silent_misses: Mapping[str, str] = dataclasses.field(default_factory=dict)  # family -> why
    forms: Tuple[str, ...] = ()  # what is unusual in it, for the table
    ids_seed: int = 1  # the ids' generator seed (another draw only where seed 1 sits on a router tie)
    slow: bool = False  # outside the default test run (time budget)

    def config_options(self) -> Dict:
        return {**COMMON, **self.options}

    def expected_counts(self) -> Dict[str, int]:
        return {f: self.expected.get(f, 0) for f in COUNTED}

    def found_counts(self, dtype: str) -> Dict[str, int]:
        return {**self.expected_counts(), **self.found.get(dtype, {})}

    def misses(self, dtype: str) -> Dict[str, int]:
        """family -> how many of the expected the backend misses today."""
        want, got = self.expected_counts(), self.found_counts(dtype)
        return {f: want[f] - got[f] for f in COUNTED if got[f] < want[f]}


def _arch(name: str, options=None, config: str = "", model: str = "", **kw) -> Arch:
    return Arch(name, config or f"{name}Config", model or f"{name}ForCausalLM", options or {}, **kw)


LLAMA_LIKE = dict(
    norm_rope_gate=2,  # <X>Attention.forward: apply_rotary_pos_emb(q, k, cos, sin), rotate_half = cat((-x2, x1))
    add_rmsnorm=5,  # <X>DecoderLayer: input_layernorm + post_attention_layernorm, x2 layers; <X>Model.norm
)

ARCHS = [
    # ---- the 16 of the original probe ---------------------------------------------------------------------
    _arch("Llama", expected=LLAMA_LIKE),  # LlamaRMSNorm: weight * x.to(dtype); the reference spelling
    _arch("Qwen2", expected=LLAMA_LIKE, forms=("q/k/v bias",)),
    _arch("Qwen3", expected=dict(
        norm_rope_gate=2,  # Qwen3Attention: q_norm/k_norm (RMSNorm over head_dim) on the [B,S,H,D] views,
                           # transpose, rotary
        add_rmsnorm=5,  # Qwen3DecoderLayer input/post_attention_layernorm x2 + Qwen3Model.norm
    ), forms=("per-head Q/K RMSNorm before rotary",)),
    _arch("Qwen3Moe", dict(MOE, decoder_sparse_step=1, mlp_only_layers=[]), expected=dict(
        norm_rope_gate=2,  # as Qwen3
        add_rmsnorm=5,  # as Qwen3
        moe_gate=2,  # Qwen3MoeTopKRouter: softmax(fp32) -> topk -> /= sum (norm_topk_prob) -> to(logits dtype)
        moe_ffn=2,  # Qwen3MoeExperts, the grouped_mm experts implementation (transformers' default)
    )),
    _arch("Mistral", expected=LLAMA_LIKE),
    _arch("Mixtral", MOE, expected=dict(
        **LLAMA_LIKE,
        moe_gate=2,  # MixtralTopKRouter: softmax(logits.float()) -> topk -> renormalise; weights left in fp32
        moe_ffn=2,  # MixtralExperts (grouped_mm)
    ), forms=("router weights left in float32",)),
    _arch("Gemma", expected=LLAMA_LIKE, forms=("RMSNorm (1 + w) in fp32",)),  # GemmaRMSNorm
    _arch("Gemma2", dict(sliding_window=4), expected=dict(
        norm_rope_gate=2,  # Gemma2Attention: plain rotary
        add_rmsnorm=9,  # Gemma2DecoderLayer: input, post_attention, pre_feedforward, post_feedforward x2 + norm
        attention_mask=2,  # eager attention (soft-capping): the full causal mask and the sliding-window one
    ), forms=("RMSNorm (1 + w)", "post-norms")),
    _arch("Gemma3", dict(sliding_window=4), config="Gemma3TextConfig", expected=dict(
        norm_rope_gate=2,  # Gemma3Attention: transpose, then q_norm/k_norm (1 + w), then rotary
        add_rmsnorm=9,  # 4 per Gemma3DecoderLayer + norm (the Q/K norms are in the prologue)
        attention_mask=1,  # the sliding-window mask, built in the graph (sdpa cannot skip a window)
    ), forms=("Q/K norm after the head transpose", "RMSNorm (1 + w)")),
    _arch("Phi3", expected=LLAMA_LIKE,  # Phi3Attention: fused qkv_proj sliced; rotary on q[..., :rot] + cat(rest)
          forms=("fused qkv_proj", "rotary on a slice (full width) + cat")),
    _arch("Olmo2", expected=dict(
        norm_rope_gate=2,  # Olmo2Attention: rotary (cos/sin stay fp32: q * cos promotes, result cast to q's dtype)
        add_rmsnorm=9,  # post_attention/post_feedforward_layernorm (post-norms) + q_norm/k_norm over the whole
                        # projection (before the head view), x2 layers, + norm; Olmo2RMSNorm: (w * x).to(dtype)
    ), forms=("rotary in fp32 (cos not cast to q's dtype)", "full-width Q/K norms", "post-norms",
              "(w * x).to(dtype) norm")),
    _arch("Granite", expected=LLAMA_LIKE, forms=("residual/embedding/attention multipliers",)),
    _arch("Cohere", expected=dict(
        norm_rope_gate=2,  # CohereAttention: interleaved rotate_half (stack((-x2, x1), -1).flatten(-2)) in fp32
        # add_rmsnorm: 0, CohereLayerNorm subtracts the mean (a LayerNorm without bias), parallel attn + MLP
    ), forms=("LayerNorm", "interleaved rotary in fp32", "parallel attention/MLP")),
    _arch("StableLm", expected=dict(
        norm_rope_gate=2,  # StableLmAttention: rotary on the first rotary_ndims (partial_rotary_factor 0.25) + cat
        # add_rmsnorm: 0, nn.LayerNorm
    ), forms=("LayerNorm", "partial rotary 0.25")),
    _arch("Glm", expected=dict(
        norm_rope_gate=2,  # GlmAttention: partial (0.5) interleaved rotary: cos[..., :r/2].repeat_interleave(2),
                           # rotate_half = stack((-x[1::2], x[0::2]), -1).flatten(-2), + cat(pass)
        add_rmsnorm=5,  # GlmDecoderLayer input/post_attention_layernorm x2 + norm
    ), forms=("interleaved partial rotary 0.5", "fused gate_up_proj")),
    _arch("Olmoe", MOE, expected=dict(
        norm_rope_gate=2,
        add_rmsnorm=9,  # input/post_attention_layernorm + full-width q_norm/k_norm, x2 layers, + norm
        moe_gate=2,  # OlmoeTopKRouter: softmax(fp32) -> topk (norm_topk_prob False: no renormalise)
        moe_ffn=2,
    ), forms=("full-width Q/K norms",)),

    # ---- added with the corpus --------------------------------------------------------------------------------
    _arch("DeepseekV3", dict(MOE, **MLA, first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1),
          expected=dict(
              norm_rope_gate=2,  # DeepseekV3Attention (MLA): apply_rotary_pos_emb_interleave (rope_interleave=True)
                                 # on q_rot (a split of the [B,H,S,nope+rope] q) and the one-head k_rot
              add_rmsnorm=9,  # input/post_attention_layernorm + q_a_layernorm + kv_a_layernorm (LoRA), x2, + norm
              moe_gate=1,  # layer 1 (first_k_dense_replace=1): DeepseekV3TopkRouter: fp32 linear, sigmoid,
                           # + e_score_correction_bias, group top-2 sums, topk groups, mask, topk, gather, renorm
                           # (+ 1e-20), * routed_scaling_factor
              moe_ffn=1,  # DeepseekV3Experts (grouped_mm); + shared_experts (dense MLP)
          ), forms=("MLA", "interleaved rotary on even/odd slices", "sigmoid grouped router + bias",
                 "shared experts", "first layer dense")),
    _arch("Qwen2Moe", dict(MOE, shared_expert_intermediate_size=128),
          expected=dict(
              **LLAMA_LIKE,
              moe_gate=2,  # Qwen2MoeTopKRouter: softmax(fp32) -> topk (norm_topk_prob False) -> to(dtype)
              moe_ffn=2,  # Qwen2MoeExperts (grouped_mm); + shared_expert scaled by sigmoid(shared_expert_gate)
          ), forms=("shared expert with sigmoid gate",)),
    _arch("Phimoe", MOE, expected=dict(
        norm_rope_gate=2,  # PhimoeAttention: plain rotary
        # add_rmsnorm: 0, PhimoeDecoderLayer uses nn.LayerNorm
        moe_gate=2,  # PhimoeTopKRouter -> sparsemixer: two rounds of max + relative-threshold mask + softmax
                     # + gather (top-2 without topk)
        moe_ffn=2,
    ), found=both(moe_gate=0),
        forms=("LayerNorm", "sparsemixer router (max, masked softmax)")),
    _arch("GraniteMoe", MOE, expected=dict(
        **LLAMA_LIKE,
        moe_gate=2,  # GraniteMoeTopKRouter: linear(...).float() -> topk on logits -> softmax over the k -> type_as
        moe_ffn=2,
    ), forms=("top-k-then-softmax router", "multipliers")),
    _arch("Glm4", expected=dict(
        norm_rope_gate=2,  # as Glm: partial interleaved rotary
        add_rmsnorm=9,  # Glm4DecoderLayer: input, post_self_attn, post_attention, post_mlp x2 + norm
    ), forms=("interleaved partial rotary 0.5", "post-norms")),
    _arch("Glm4Moe", dict(MOE, n_routed_experts=4), expected=dict(
        norm_rope_gate=2,  # Glm4MoeAttention: partial (0.5) rotate_half rotary + cat (use_qk_norm False)
        add_rmsnorm=5,
        moe_gate=1,  # layer 1 (first_k_dense_replace=1): Glm4MoeTopkRouter, DeepSeek-V3's (n_group=1)
        moe_ffn=1,  # + shared_experts
    ), forms=("partial rotary 0.5", "sigmoid router + bias", "shared experts")),
    _arch("Ernie4_5", expected=dict(
        norm_rope_gate=2,  # Ernie4_5 apply_rotary_pos_emb: interleaved (repeat_interleave cos, stack/flatten)
                           # full width, in fp32 (q.float(), cos left fp32), cast back
        add_rmsnorm=5,
    ), forms=("interleaved rotary in fp32",)),
    _arch("Ernie4_5_Moe", dict(MOE, moe_num_experts=4, moe_k=2), expected=dict(
        norm_rope_gate=2,  # as Ernie4_5
        add_rmsnorm=5,
        moe_gate=1,  # layer 1 (moe_layer_start_index=1): Ernie4_5_MoeTopKRouter: fp32 linear, softmax(dim=1),
                     # topk on probs + e_score_correction_bias (moe_statics), gather, / clamp(sum, norm_min)
        moe_ffn=1,  # + 2 shared experts (moe_num_shared_experts default)
    ), forms=("interleaved rotary in fp32", "softmax router + bias, clamp renorm", "shared experts")),
    _arch("SmolLM3", expected=LLAMA_LIKE,  # no_rope_layers: [1, 1] for 2 layers, both rotate
          forms=("NoPE every 4th layer (none here)",)),
    _arch("Olmo3", dict(sliding_window=4), expected=dict(
        norm_rope_gate=2,  # as Olmo2 (rotary result .to(q_type))
        add_rmsnorm=9,  # as Olmo2
        attention_mask=1,  # masking_utils' sliding-window mask, built in the graph (sdpa cannot skip a window)
    ), forms=("rotary in fp32 (cos not cast to q's dtype)", "full-width Q/K norms", "post-norms")),
    _arch("Exaone4", dict(sliding_window=4), expected=dict(
        norm_rope_gate=2,  # Exaone4Attention: transpose, q_norm/k_norm (Llama RMSNorm, head_dim), rotary on
                           # sliding layers (both, with sliding_window_pattern 4)
        add_rmsnorm=5,  # post_attention/post_feedforward_layernorm x2 + norm (the Q/K norms are the prologue's)
        attention_mask=1,  # the sliding-window mask, as Gemma3
    ), forms=("Q/K norm after the head transpose (weight * x.to(dtype))", "post-norms")),
    _arch("HunYuanDenseV1", expected=dict(
        norm_rope_gate=2,  # HunYuanDenseV1Attention: rotary, then query_layernorm/key_layernorm
        add_rmsnorm=9,  # input/post_attention_layernorm + the two Q/K norms *after* the rotary, x2, + norm
    ), forms=("Q/K norm after the rotary",)),
    _arch("HunYuanMoEV1", dict(MOE, moe_topk=2), expected=dict(
        norm_rope_gate=2, add_rmsnorm=9,  # as HunYuanDenseV1
        moe_gate=2,  # HunYuanMoEV1Gate: wg linear, softmax(dim=1, fp32), topk, /= sum, to(logits dtype)
        moe_ffn=2,  # + shared_mlp
    ), forms=("Q/K norm after the rotary", "softmax over dim=1", "shared MLP")),
    _arch("Dots1", dict(MOE, n_routed_experts=4, n_shared_experts=1), ids_seed=8, expected=dict(
        norm_rope_gate=2,  # Dots1Attention: Qwen3 form (per-head q_norm/k_norm before the transpose)
        add_rmsnorm=5,
        moe_gate=2,  # Dots1TopkRouter, DeepSeek-V3's (n_group=1, norm_topk_prob False, scale 1.0)
        moe_ffn=2,  # first_k_dense_replace=0: both layers; + shared_experts
    ), forms=("sigmoid router + bias (one group)", "shared experts")),
    _arch("Arcee", expected=LLAMA_LIKE, forms=("ReLU^2 MLP (no gate)",)),
    _arch("Apertus", expected=dict(
        norm_rope_gate=2,  # ApertusAttention: transpose, q_norm/k_norm (head_dim), rotary (llama3 rope type)
        add_rmsnorm=5,  # attention_layernorm/feedforward_layernorm x2 + norm (the Q/K norms are the prologue's)
    ), forms=("Q/K norm after the head transpose (weight * x.to(dtype))", "xIELU MLP")),
    _arch("SeedOss", expected=LLAMA_LIKE, forms=("q/k/v bias",)),
    _arch("Llama4", dict(MOE, num_experts_per_tok=1, intermediate_size_mlp=128), config="Llama4TextConfig",
          ids_seed=8, expected=dict(
              norm_rope_gate=2,  # Llama4TextAttention.apply_rotary_emb: view_as_complex(q.float()) * freqs_cis
                                 # (polar) on the [B,S,H,D] views, before the transpose (no_rope_layers [1, 1])
              add_rmsnorm=9,  # input/post_attention_layernorm x2 + norm, + Llama4TextL2Norm (RMSNorm without
                              # weight: x * rsqrt(mean(x^2) + eps)) on q and k *after* the rotary, x2
              moe_gate=2,  # Llama4Router: topk on logits, scatter into -inf, sigmoid (top-1)
              moe_ffn=2,  # Llama4TextExperts: every token through every expert (bmm), inputs pre-scaled by the
                          # router scores (top-1: the one expert's input is x * s); + shared_expert
          ),  # the rotation is a primitive (rotary_complex_pairs), the pair fuses
          # moe_ffn is recognised (dense_top1_bmm) and left dense on purpose: fused, the layer ran slower on the
          # H200 (benchmarks/NOTES.md v34); the near miss says so
          found=both(moe_ffn=0),
          forms=("complex (view_as_complex) rotary in fp32", "weightless L2 Q/K norm after the rotary",
                 "top-k-then-sigmoid router", "dense all-expert bmm", "shared expert")),
    _arch("Starcoder2", expected=dict(
        norm_rope_gate=2,
        # add_rmsnorm: 0, nn.LayerNorm
    ), forms=("LayerNorm", "GELU MLP with bias")),
    _arch("GptOss", MOE, ids_seed=8, expected=dict(
        norm_rope_gate=2,  # GptOss _apply_rotary_emb: x1, x2 = chunk(2); cat(x1*cos - x2*sin, x2*cos + x1*sin),
                           # cos/sin half width
        add_rmsnorm=5,  # GptOssRMSNorm: (weight * x).to(dtype)
        moe_gate=2,  # GptOssTopKRouter: linear with bias, topk on logits, softmax over the k (dim=1)
        moe_ffn=2,  # GptOssExperts (grouped_mm with biases): gate/up interleaved [::2]/[1::2], clamp,
                    # gate * sigmoid(1.702 gate) * (up + 1)
        attention_mask=2,  # eager attention (sinks): the full causal mask and the sliding-window one
    ), forms=("rotary without rotate_half (chunk, sub/add, cat)", "top-k-then-softmax router with bias",
               "expert biases, clamped interleaved SwiGLU", "attention sinks")),
    _arch("Qwen3Next", dict(MOE, layer_types=["linear_attention", "full_attention"],
                            shared_expert_intermediate_size=128), ids_seed=4, expected=dict(
        norm_rope_gate=1,  # the one full_attention layer: Qwen3NextAttention: gated q (q_proj -> q, gate),
                           # q_norm/k_norm (1 + w, per head, before the transpose), partial rotary 0.25 + cat
        add_rmsnorm=6,  # input/post_attention_layernorm x2 + norm (Qwen3NextRMSNorm, 1 + w) + the gated
                        # Qwen3NextRMSNormGated of the linear-attention layer; the l2norm of q/k in
                        # torch_chunk_gated_delta_rule (x * rsqrt(sum(x^2) + eps)) is not an RMSNorm
        moe_gate=2,  # Qwen3NextTopKRouter (Qwen3-MoE's)
        moe_ffn=2,  # + shared_expert with sigmoid gate
    ),
        forms=("hybrid linear attention (gated delta rule)", "gated q", "1 + w Q/K norm before the transpose",
               "partial rotary 0.25", "gated RMSNorm")),
    _arch("DeepseekV2", dict(MOE, **MLA), expected=dict(
        norm_rope_gate=2,  # DeepseekV2 apply_rotary_emb: view_as_complex(q_pe.float()) * freqs_cis
        add_rmsnorm=9,  # as DeepseekV3 (q_a_layernorm, kv_a_layernorm)
        moe_gate=2,  # DeepseekV2TopkRouter: fp32 linear, softmax, topk(sorted=False) (topk_method greedy),
                     # no renormalise, * routed_scaling_factor (1.0)
        moe_ffn=2,  # first_k_dense_replace=0; + shared_experts
    ),  # MLA's q_pe / k_pe rotations: complex pairs (rotary_complex_pairs), fused as a pair (rope_pair)
        forms=("MLA", "complex rotary in fp32", "softmax greedy router, unsorted top-k", "shared experts")),
    _arch("Cohere2", dict(sliding_window=4), expected=dict(
        norm_rope_gate=2,  # Cohere2Attention: as Cohere, on sliding layers (both here)
        attention_mask=1,  # the sliding-window mask, as Olmo3
        # add_rmsnorm: 0, Cohere2LayerNorm (mean subtracted)
    ), forms=("LayerNorm", "interleaved rotary in fp32", "parallel attention/MLP")),
    _arch("Helium", expected=dict(
        norm_rope_gate=2,  # Helium apply_rotary_pos_emb: interleaved (repeat_interleave cos, stack/flatten), q's dtype
        add_rmsnorm=5,  # HeliumRMSNorm: (weight.to(fp32) * x).to(dtype)
    ), forms=("interleaved rotary", "weight cast to fp32 in the norm")),
    _arch("Ministral", dict(sliding_window=4), expected=dict(**LLAMA_LIKE, attention_mask=1),  # as Olmo3
          forms=("sliding window",)),
]

# The slowest half (tests/test_corpus.py runs them only with `-m slow`): the 41 architectures in both dtypes
# took 305 s under pytest on the 2-core CPU machine, over the 3-minute budget of the default run; these 20
# took 201 s of it (mean of two timed runs; Qwen3Next alone 45 s: its linear-attention layer's chunked
# delta rule in torch).
SLOW = ("DeepseekV2", "DeepseekV3", "Dots1", "Ernie4_5_Moe", "Exaone4", "Gemma", "Gemma2", "Gemma3", "GptOss",
        "Granite", "GraniteMoe", "HunYuanDenseV1", "HunYuanMoEV1", "Mixtral", "Olmoe", "Phimoe", "Qwen2Moe", "Qwen3",
        "Qwen3Moe", "Qwen3Next")
ARCHS = [dataclasses.replace(a, slow=a.name in SLOW) for a in ARCHS]
