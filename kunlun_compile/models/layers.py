"""Model building blocks written the way vLLM writes them (native torch paths).

These are deliberately *not* calls to kunlun:: ops: they are the unmodified
model code the backend must recognise.  Rounding follows vLLM: RMSNorm casts
to the input dtype before the weight multiply, Gemma-style norm multiplies
`(1 + w)` in fp32 and casts once, RoPE casts cos/sin to the input dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# vLLM's router and the gather form of the routed experts, written once: as the fusion rules' search
# functions (the rules own the spelling they match; this demo model uses it)
from ..passes.rules.moe_experts import gather_experts as experts_forward
from ..passes.rules.moe_gate import select_experts
from .attention_op import attention


# ---- vocab-parallel embedding ------------------------------------------------------------

def get_masked_input_and_mask(input_: torch.Tensor, org_vocab_start_index: int, org_vocab_end_index: int,
                              num_org_vocab_padding: int, added_vocab_start_index: int,
                              added_vocab_end_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Map global token ids to this shard's rows; the mask is True off-shard."""
    org_vocab_mask = (input_ >= org_vocab_start_index) & (input_ < org_vocab_end_index)
    added_vocab_mask = (input_ >= added_vocab_start_index) & (input_ < added_vocab_end_index)
    added_offset = added_vocab_start_index - (org_vocab_end_index - org_vocab_start_index) - num_org_vocab_padding
    valid_offset = (org_vocab_start_index * org_vocab_mask) + (added_offset * added_vocab_mask)
    vocab_mask = org_vocab_mask | added_vocab_mask
    input_ = vocab_mask * (input_ - valid_offset)
    return input_, ~vocab_mask


class VocabParallelEmbedding(nn.Module):
    """Holds shard `tp_rank` of `tp_size` of the vocabulary (tensor parallel, simulated)."""

    def __init__(self, vocab_size: int, dim: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        per_shard = -(-vocab_size // tp_size)
        self.start = tp_rank * per_shard
        self.end = min(vocab_size, self.start + per_shard)
        self.weight = nn.Parameter(torch.randn(per_shard, dim) * 0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        masked, off_shard = get_masked_input_and_mask(input_ids, self.start, self.end, 0, self.end, self.end)
        out = F.embedding(masked, self.weight)
        return out.masked_fill(off_shard.unsqueeze(-1), 0)  # all-reduce across shards would follow


# ---- norms -------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """vLLM's RMSNorm.forward_native; `forward(x, residual)` fuses the residual add."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        orig_dtype = x.dtype
        x = x.to(torch.float32)
        if residual is not None:
            x = x + residual.to(torch.float32)
            residual = x.to(orig_dtype)
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        x = x.to(orig_dtype) * self.weight
        return x if residual is None else (x, residual)


class GemmaRMSNorm(nn.Module):
    """Gemma / Qwen3-Next style: weight stored as an offset from 1, applied in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        orig_dtype = x.dtype
        if residual is not None:
            x = x + residual
            residual = x
        x = x.float()
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        x = (x * (1.0 + self.weight.float())).to(orig_dtype)
        return x if residual is None else (x, residual)


def make_norm(dim: int, eps: float, gemma: bool) -> nn.Module:
    return GemmaRMSNorm(dim, eps) if gemma else RMSNorm(dim, eps)


# ---- rotary embedding ----------------------------------------------------------------------------

def apply_rotary_emb_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool):
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox_style:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


class RotaryEmbedding(nn.Module):
    """cos/sin cache `[max_positions, rotary_dim]` = cat(cos, sin), indexed by positions."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, base: float, is_neox_style: bool):
        super().__init__()
        self.head_dim, self.rotary_dim, self.is_neox_style = head_dim, rotary_dim, is_neox_style
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        positions = positions.flatten()
        num_tokens = positions.shape[0]
        cos_sin = self.cos_sin_cache.index_select(0, positions)
        cos, sin = cos_sin.chunk(2, dim=-1)
        return self._rotate(query, cos, sin, num_tokens), self._rotate(key, cos, sin, num_tokens)

    def _rotate(self, x: torch.Tensor, cos, sin, num_tokens: int) -> torch.Tensor:
        shape = x.shape
        x = x.view(num_tokens, -1, self.head_dim)
        x_rot = apply_rotary_emb_torch(x[..., : self.rotary_dim], cos, sin, self.is_neox_style)
        return torch.cat((x_rot, x[..., self.rotary_dim:]), dim=-1).reshape(shape)


# ---- attention --------------------------------------------------------------------------------------

def build_attention_mask(positions: torch.Tensor, sliding_window: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """Additive [T, T] mask: causal, optionally limited to a sliding window."""
    q_pos = positions.unsqueeze(1)
    k_pos = positions.unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed, float("-inf"))


class Attention(nn.Module):
    """Fused qkv(+gate) projection, optional per-head Q/K norm, rotary, attention op, gate, o_proj."""

    def __init__(self, cfg):
        super().__init__()
        self.nq, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nq * self.d, self.nkv * self.d
        self.gated = cfg.attn_output_gate
        q_cols = self.q_size * (2 if self.gated else 1)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_cols + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = make_norm(self.d, cfg.rms_norm_eps, cfg.gemma_norm) if cfg.qk_norm else None
        self.k_norm = make_norm(self.d, cfg.rms_norm_eps, cfg.gemma_norm) if cfg.qk_norm else None
        self.rotary_emb = RotaryEmbedding(self.d, cfg.rotary_dim or self.d, cfg.max_position_embeddings,
                                          cfg.rope_theta, cfg.rope_is_neox)
        self.scale = 1.0 / math.sqrt(self.d)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        if self.gated:
            q_gate, k, v = qkv.split([self.q_size * 2, self.kv_size, self.kv_size], dim=-1)
            orig_shape = q_gate.shape[:-1]
            q_gate = q_gate.view(*orig_shape, self.nq, -1)
            q, gate = torch.chunk(q_gate, 2, dim=-1)
            q = q.reshape(*orig_shape, -1)
            gate = gate.reshape(*orig_shape, -1)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.view(-1, self.nq, self.d)).view(-1, self.q_size)
            k = self.k_norm(k.view(-1, self.nkv, self.d)).view(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        out = attention(q, k, v, mask, self.nq, self.nkv, self.d, self.scale)
        if self.gated:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out)


# ---- feed-forward --------------------------------------------------------------------------------------

class MLP(nn.Module):
    """gate_up_proj (fused) -> SiluAndMul -> down_proj."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        d = gate_up.shape[-1] // 2
        return self.down_proj(F.silu(gate_up[..., :d]) * gate_up[..., d:])


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg = cfg
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) / math.sqrt(H))
        self.w2 = nn.Parameter(torch.randn(E, H, I) / math.sqrt(I))
        self.correction_bias = nn.Parameter(0.1 * torch.randn(E)) if cfg.correction_bias else None
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(H, shared) if shared else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        router_logits = self.gate(x)
        topk_weights, topk_ids = select_experts(router_logits, c.num_experts_per_tok, c.scoring_func,
                                                c.norm_topk_prob, c.n_group, c.topk_group, self.correction_bias,
                                                c.routed_scaling_factor)
        out = experts_forward(x, self.w13, self.w2, topk_weights, topk_ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
