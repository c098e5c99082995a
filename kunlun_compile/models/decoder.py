"""A decoder-only transformer assembled from the vLLM-style layers."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .layers import MLP, Attention, MoE, VocabParallelEmbedding, build_attention_mask, make_norm


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and variants; names follow HF configs where one exists."""

    name: str
    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rotary_dim: Optional[int] = None  # None: the whole head
    rope_is_neox: bool = True
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False
    gemma_norm: bool = False  # (1 + w) norms everywhere, as Qwen3-Next
    attn_output_gate: bool = False
    sliding_window: Optional[int] = None
    intermediate_size: int = 128
    # MoE (num_experts = 0: dense MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    # Simulated vocab-parallel shard of the embedding.
    tp_rank: int = 0
    tp_size: int = 1


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norm)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norm)
        self.mlp = MoE(cfg) if cfg.num_experts else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, positions, hidden_states, residual, mask):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, mask)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DecoderModel(nn.Module):
    """forward(input_ids [T], positions [T]) -> logits [T, vocab]: one sequence, prefill."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.tp_rank, cfg.tp_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norm)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        mask = build_attention_mask(positions, self.config.sliding_window, hidden_states.dtype)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, mask)
        hidden_states, _ = self.norm(hidden_states, residual)
        return self.lm_head(hidden_states)
