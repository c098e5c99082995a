"""Built-in random-weight models: the same models serve the demo, tests, benchmarks and CLI.

    model, inputs = build_model("qwen3-next-tiny", dtype=torch.bfloat16, num_tokens=32)
    logits = model(*inputs)
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from .attention_op import ATTENTION_OP_NAME, attention
from .decoder import DecoderModel, ModelConfig

BUILTIN_CONFIGS: Dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig("llama-tiny"),
        ModelConfig("qwen3-tiny", qk_norm=True),
        ModelConfig("qwen3-next-tiny", qk_norm=True, gemma_norm=True, attn_output_gate=True, head_dim=32,
                    rotary_dim=8, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=64,
                    shared_expert_gate=True),
        ModelConfig("qwen3-moe-tiny", qk_norm=True, num_experts=8, num_experts_per_tok=2),
        ModelConfig("deepseek-v3-tiny", rope_is_neox=False, num_experts=16, num_experts_per_tok=4,
                    scoring_func="sigmoid", n_group=4, topk_group=2, correction_bias=True,
                    routed_scaling_factor=2.5, shared_expert_intermediate_size=64),
    ]
}


def builtin_names() -> Tuple[str, ...]:
    return tuple(BUILTIN_CONFIGS)


def build_model(name: str, *, dtype: torch.dtype = torch.float32, device="cpu", num_tokens: int = 16,
                seed: int = 0, **overrides):
    """(model in eval mode without grads, (input_ids, positions)) for a built-in model.

    `overrides` replace config fields (e.g. num_hidden_layers=4, hidden_size=2048).
    """
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models are {list(BUILTIN_CONFIGS)}")
    cfg = dataclasses.replace(BUILTIN_CONFIGS[name], **overrides)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = DecoderModel(cfg)
        input_ids, positions = make_inputs(cfg, num_tokens, device=device)
    finally:
        torch.random.set_rng_state(gen_state)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, (input_ids, positions)


def make_inputs(cfg: ModelConfig, num_tokens: int, device="cpu", generator=None):
    """Fresh random token ids (over the whole vocabulary: some fall off a simulated shard) and positions."""
    input_ids = torch.randint(0, cfg.vocab_size, (num_tokens,), generator=generator).to(device)
    start = int(torch.randint(0, cfg.max_position_embeddings - num_tokens + 1, (1,), generator=generator))
    positions = torch.arange(start, start + num_tokens).to(device)
    return input_ids, positions


__all__ = ["ATTENTION_OP_NAME", "BUILTIN_CONFIGS", "DecoderModel", "ModelConfig", "attention", "build_model",
           "builtin_names", "make_inputs"]
