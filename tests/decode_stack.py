"""A decode stack written for the runtime regression tests (tests/test_runtime_regressions.py).

Each layer: RMSNorm -> qkv linear -> per-head Q/K RMSNorm with (1 + w) weights, partial neox rotary
from `cos_sin_cache.index_select(0, positions)`, sigmoid output gate -> SDPA (GQA) over a KV cache
given as a list of tensors and concatenated with the new k/v -> linear(attn * gate) + residual ->
RMSNorm -> MoE (softmax top-k router; experts over argsort-ed tokens with bincount.cumsum offsets;
index_add_ back) + residual.  One token per sequence (decode): `x` is [batch, hidden].
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class StackConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    rotary_dim: int = 8  # partial rotary: the first rotary_dim channels of each head
    experts: int = 16
    top_k: int = 8
    moe_inter: int = 32
    max_positions: int = 512
    cache_len: int = 7
    eps: float = 1e-6
    # "grouped_mm": torch._grouped_mm (its meta function takes bf16 only, so compiled fp32 cannot use it);
    # "gather_bmm": the same sorted rows, each multiplied by its expert's gathered weights;
    # "loop": one matmul per expert over its slice of the sorted rows (host reads the offsets; eager only)
    experts_impl: str = "gather_bmm"


CPU_CONFIG = StackConfig()
GPU_CONFIG = StackConfig(hidden=2048, layers=4, heads=16, kv_heads=2, head_dim=128, rotary_dim=32,
                         experts=16, top_k=8, moe_inter=512, cache_len=200, experts_impl="grouped_mm")


def _weight(gen: torch.Generator, *shape: int, fan_in: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=gen) / fan_in ** 0.5, requires_grad=False)


def _offset_weight(gen: torch.Generator, n: int) -> nn.Parameter:
    """A `(1 + w)` norm weight: stored near 0."""
    return nn.Parameter(torch.randn(n, generator=gen) * 0.05, requires_grad=False)


def _unit_weight(gen: torch.Generator, n: int) -> nn.Parameter:
    return nn.Parameter(1.0 + torch.randn(n, generator=gen) * 0.05, requires_grad=False)


def rotate_neox_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, head_dim]; cos/sin [B, rotary_dim / 2]: rotate the first rotary_dim channels, neox style
    (first half against second half)."""
    half = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    front, back, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([front * cos - back * sin, back * cos + front * sin, rest], dim=-1)


class Experts(nn.Module):
    def __init__(self, gen: torch.Generator, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.router = _weight(gen, cfg.experts, cfg.hidden, fan_in=cfg.hidden)
        # [E, K, N]: the layout _grouped_mm multiplies by
        self.gate_up = _weight(gen, cfg.experts, cfg.hidden, 2 * cfg.moe_inter, fan_in=cfg.hidden)
        self.down = _weight(gen, cfg.experts, cfg.moe_inter, cfg.hidden, fan_in=cfg.moe_inter)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        probs = F.linear(h, self.router).float().softmax(dim=-1)
        weights, chosen = probs.topk(cfg.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # rows grouped by expert
        ends = torch.bincount(flat, minlength=cfg.experts).cumsum(0)
        source_rows = order // cfg.top_k
        rows = h[source_rows]
        if cfg.experts_impl == "grouped_mm":
            offs = ends.to(torch.int32)
            gate, up = torch._grouped_mm(rows, self.gate_up, offs=offs).chunk(2, dim=-1)
            out = torch._grouped_mm(F.silu(gate) * up, self.down, offs=offs)
        elif cfg.experts_impl == "loop":  # eager only (host reads): the float64 reference's spelling
            out = torch.empty(rows.shape[0], cfg.hidden, dtype=h.dtype, device=h.device)
            for e, (lo, hi) in enumerate(zip([0] + ends[:-1].tolist(), ends.tolist())):
                gate, up = (rows[lo:hi] @ self.gate_up[e]).chunk(2, dim=-1)
                out[lo:hi] = (F.silu(gate) * up) @ self.down[e]
        else:
            expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=h.device), right=True)
            gate, up = torch.bmm(rows.unsqueeze(1), self.gate_up[expert]).squeeze(1).chunk(2, dim=-1)
            out = torch.bmm((F.silu(gate) * up).unsqueeze(1), self.down[expert]).squeeze(1)
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(h).index_add_(0, source_rows, out)


class DecodeLayer(nn.Module):
    def __init__(self, gen: torch.Generator, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.attn_norm = _unit_weight(gen, cfg.hidden)
        # per head: q then its gate (interleaved), then k and v for the kv heads
        self.qkv = _weight(gen, cfg.heads * 2 * d + 2 * cfg.kv_heads * d, cfg.hidden, fan_in=cfg.hidden)
        self.q_norm = _offset_weight(gen, d)
        self.k_norm = _offset_weight(gen, d)
        self.o_proj = _weight(gen, cfg.hidden, cfg.heads * d, fan_in=cfg.heads * d)
        self.moe_norm = _unit_weight(gen, cfg.hidden)
        self.experts = Experts(gen, cfg)

    def head_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.cfg.eps) * (1.0 + w.float())).to(x.dtype)

    def forward(self, x, cos, sin, k_cache, v_cache):
        cfg, b, d = self.cfg, x.shape[0], self.cfg.head_dim
        h = F.rms_norm(x, (cfg.hidden,), self.attn_norm, cfg.eps)
        q_gate, k, v = F.linear(h, self.qkv).split([cfg.heads * 2 * d, cfg.kv_heads * d, cfg.kv_heads * d], dim=-1)
        q, gate = q_gate.view(b, cfg.heads, 2 * d).chunk(2, dim=-1)
        q = rotate_neox_partial(self.head_norm(q, self.q_norm), cos, sin)
        k = rotate_neox_partial(self.head_norm(k.view(b, cfg.kv_heads, d), self.k_norm), cos, sin)
        keys = torch.cat([k_cache, k.unsqueeze(2)], dim=2)
        values = torch.cat([v_cache, v.view(b, cfg.kv_heads, 1, d)], dim=2)
        attn = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=True)
        attn = attn.reshape(b, cfg.heads * d) * torch.sigmoid(gate.reshape(b, cfg.heads * d))
        x = x + F.linear(attn, self.o_proj)
        return x + self.experts(F.rms_norm(x, (cfg.hidden,), self.moe_norm, cfg.eps))


class DecodeStack(nn.Module):
    def __init__(self, cfg: StackConfig = CPU_CONFIG, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.layers = nn.ModuleList(DecodeLayer(gen, cfg) for _ in range(cfg.layers))
        self.final_norm = _unit_weight(gen, cfg.hidden)
        half = cfg.rotary_dim // 2
        inv_freq = 1.0 / (1e6 ** (torch.arange(half, dtype=torch.float64) / half))
        angles = torch.arange(cfg.max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat([angles.cos(), angles.sin()], dim=-1).float())

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_caches: List[torch.Tensor]) -> torch.Tensor:
        cos, sin = self.cos_sin_cache.index_select(0, positions).to(x.dtype).chunk(2, dim=-1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_caches[2 * i], kv_caches[2 * i + 1])
        return F.rms_norm(x, (self.cfg.hidden,), self.final_norm, self.cfg.eps)


def make_inputs(cfg: StackConfig, batch: int, generator: torch.Generator, device="cpu", dtype=torch.float32,
                cache_len: Optional[int] = None) -> tuple:
    """Fresh random inputs for one decode step: hidden states, positions, and the KV cache list."""
    length = cfg.cache_len if cache_len is None else cache_len
    x = torch.randn(batch, cfg.hidden, generator=generator)
    positions = torch.randint(length, cfg.max_positions, (batch,), generator=generator)
    caches = [torch.randn(batch, cfg.kv_heads, length, cfg.head_dim, generator=generator)
              for _ in range(2 * cfg.layers)]
    return x.to(device, dtype), positions.to(device), [c.to(device, dtype) for c in caches]


def build(cfg: StackConfig = CPU_CONFIG, device="cpu", dtype=torch.float32, seed: int = 0) -> DecodeStack:
    return DecodeStack(cfg, seed).to(device=device, dtype=dtype).eval()
