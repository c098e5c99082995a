"""A differential fuzzer for the graph runtime (kunlun_compile/runtime/).

`generate(seed)` builds a small random decoder-like model from a vocabulary of blocks (norms,
linears, SwiGLU, attention over the step's tokens or over caches, MoE in several spellings, host
syncs, graph breaks inside a layer, long residuals, outputs that alias inputs or are views, tuple
and dict outputs).  `run_case(case)` compiles it in every graph mode and compares every call with
eager: fresh random inputs each call, sizes that are a capture size, that need padding and that are
above the largest capture size, outputs the caller holds from earlier calls, and in-place cache
updates.  Everything is deterministic by seed.

    python3 tests/runtime_fuzz.py --seeds 0-49 --device cpu
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import random
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from kunlun_compile.runtime.executor import SizeAssumptionBroken

# cuBLAS picks one reduction order only with a fixed workspace (read when its handle is made): see
# `deterministic_torch`
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

MODES = ("none", "piecewise", "full", "full_and_piecewise")
CAPTURE_SIZES = (1, 2, 4, 8)
FP32_TOL = 1e-4  # relative to the reference norm
BF16_TOL = 2e-2  # the README's bf16 tolerance; widened by eager's own error against float64
# How far another, equally accurate rounding of the same maths moves eager's result: eager re-run with
# each MoE layer's input perturbed by eager's own error there (vs float64), ROUNDING_SAMPLES times.  A
# token whose router top-k sits within rounding of a tie may then pick other experts -- as a fused kernel
# may -- and that moves its row, and through attention and caches later tokens, by far more than bf16
# noise.  The tolerance of a call is widened to SPREAD_FACTOR times this spread.
ROUNDING_SAMPLES = 4
SPREAD_FACTOR = 2.0
# The random perturbation above reaches a tie only by chance: a margin of 2 ulps flipped on the H200 (seed 43:
# a fused o_proj moved one router logit by 1 ulp, and the token took its runner-up expert) where no sample
# did.  So eager also runs once with every top-k margin within TIE_ULPS units in the last place of the
# router's logits decided the other way (`FlippedTies`); that run's distance joins the spread.
TIE_ULPS = 4
MAX_SLOTS = 16  # in-place cache length; every size written into it stays below it

# feature -> what it means; the generator claims these and `evidence` checks them on the built model
FEATURES = {
    "layout_flat": "[tokens, hidden] inputs (vLLM style)",
    "layout_bsh": "[batch, seq, hidden] inputs",
    "vary_tokens": "flat layout: the token count varies",
    "vary_batch": "bsh layout: the batch varies, seq fixed",
    "vary_seq": "bsh layout, batch 1: the sequence length varies (HF prefill)",
    "dynamic": "kunlun_compile.compile(dynamic=True): one graph for every size",
    "static": "torch.compile(dynamic=False): one graph per size",
    "norm_rms_fn": "RMSNorm as F.rms_norm",
    "norm_rms_manual": "RMSNorm as pow(2).mean + rsqrt",
    "norm_gemma": "Gemma RMSNorm, (1 + w)",
    "ffn_linear": "one linear + activation",
    "ffn_swiglu": "gated linear (SwiGLU)",
    "attn_self_sdpa": "causal attention over the step's tokens, F.scaled_dot_product_attention",
    "attn_self_matmul": "causal attention over the step's tokens, matmul + softmax",
    "attn_cache_cat": "attention over a KV cache passed as a list of tensors, cat with the new k/v",
    "attn_cache_inplace_input": "new k/v written in place into a cache input, then the cache is read",
    "attn_cache_inplace_buffer": "new k/v written in place into a cache buffer, then the cache is read",
    "cache_index_copy": "the in-place cache write is index_copy_",
    "cache_slice_assign": "the in-place cache write is a slice assignment",
    "cache_growing": "the KV cache length grows from call to call (HF generate)",
    "gqa": "fewer kv heads than query heads",
    "rope": "partial neox rotary from cos_sin_cache.index_select(0, positions)",
    "attn_gate": "q and a sigmoid output gate interleaved per head, split with chunk (Qwen3-Next)",
    "qk_norm": "per-head RMSNorm of q and k (the model's norm spelling) before the rotary (Qwen3)",
    "moe_loop_where": "MoE: loop over experts, torch.where(topk_ids == e), index_add_",
    "moe_loop_nonzero": "MoE: loop over experts, mask.nonzero(), index_add",
    "moe_gather_bmm": "MoE: expert weights gathered per (token, k), bmm",
    "moe_sorted_bmm": "MoE: argsort-ed tokens, bincount.cumsum offsets, bmm per row, index_add_",
    "moe_grouped_mm": "MoE: argsort-ed tokens, bincount.cumsum offsets, torch._grouped_mm, index_add_ (bf16)",
    "moe_dense_mask": "MoE: every expert on every token, combined by a scattered weight mask",
    "host_sync_item": ".item() inside a layer (host sync)",
    "graph_break": "torch._dynamo.graph_break() inside a layer: one graph shared by every layer",
    "dyn_shape_capture": "Dynamo captures data-dependent shapes and scalars (no graph break at nonzero/item)",
    "long_residual": "a residual from the input added after the last layer (crosses every piece)",
    "out_single": "one output tensor",
    "out_tuple": "a tuple of outputs",
    "out_dict": "a dict of outputs",
    "out_view": "an output that is a view of another output",
    "out_slice": "an output that is a slice x[:, :k]",
    "out_input_alias": "an input returned unchanged",
    "out_squeeze": "flat layout: attention's batch dim of 1 removed with squeeze(0), not [0] (size-oblivious tracing)",
}
BF16_ONLY = {"moe_grouped_mm"}  # _grouped_mm's meta function accepts bf16 only (torch 2.13)


# ---- the spec: every structural choice, drawn from the seed -------------------------------------------

@dataclasses.dataclass
class Spec:
    seed: int
    dtype: torch.dtype
    layout: str  # "flat" | "bsh"
    vary: str  # "tokens" | "batch" | "seq"
    dynamic: bool
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    norm: str
    attn: str  # "none" | "self_sdpa" | "self_matmul" | "cache_cat" | "cache_inplace"
    attn_spelling: str  # "sdpa" | "matmul" (cache attention)
    cache_where: str  # "input" | "buffer" (in-place cache)
    cache_write: str  # "index_copy" | "slice"
    slice_start: int
    cache_len: int  # cat-ed cache length at call 0
    growing: bool
    rope: bool
    ffn: str  # "linear" | "swiglu" | "moe"
    moe: str  # spelling
    experts: int
    top_k: int
    renorm: bool
    host_sync: bool
    graph_break: str  # "" | "mid" | "end"
    dyn_capture: bool
    long_residual: bool
    out_kind: str  # "single" | "tuple" | "dict"
    out_extras: Tuple[str, ...]  # "view" | "slice" | "input" | "prenorm"
    fixed: int  # the dim that does not vary (bsh: seq for vary_batch)
    attn_gate: bool = False  # q and a sigmoid output gate interleaved per head (Qwen3-Next)
    squeeze: bool = False  # flat layout: attention's batch dim of 1 dropped with squeeze(0) (else with [0])
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (Qwen3)

    def features(self) -> List[str]:
        f = [f"layout_{self.layout}", f"vary_{self.vary}", "dynamic" if self.dynamic else "static"]
        f.append({"rms_fn": "norm_rms_fn", "rms_manual": "norm_rms_manual", "gemma": "norm_gemma"}[self.norm])
        if self.attn in ("self_sdpa", "self_matmul"):
            f.append(f"attn_{self.attn}")
        elif self.attn == "cache_cat":
            f.append("attn_cache_cat")
            f += ["cache_growing"] if self.growing else []
        elif self.attn == "cache_inplace":
            f += [f"attn_cache_inplace_{self.cache_where}",
                  "cache_index_copy" if self.cache_write == "index_copy" else "cache_slice_assign"]
        if self.attn != "none":
            f += (["gqa"] if self.kv_heads < self.heads else []) + (["rope"] if self.rope else [])
            f += ["attn_gate"] if self.attn_gate else []
            f += ["qk_norm"] if self.qk_norm else []
        f += ["out_squeeze"] if self.squeeze and self.attn != "none" else []
        f.append(f"ffn_{self.ffn}" if self.ffn != "moe" else f"moe_{self.moe}")
        f += ["host_sync_item"] if self.host_sync else []
        f += ["graph_break"] if self.graph_break else []
        f += ["dyn_shape_capture"] if self.dyn_capture else []
        f += ["long_residual"] if self.long_residual else []
        f.append(f"out_{self.out_kind}")
        f += [{"view": "out_view", "slice": "out_slice", "input": "out_input_alias"}[e]
              for e in self.out_extras if e != "prenorm"]
        return sorted(set(f))

    def short(self) -> str:
        attn = self.attn if self.attn != "cache_inplace" else f"inplace-{self.cache_where}-{self.cache_write}"
        ffn = self.ffn if self.ffn != "moe" else f"moe-{self.moe}"
        bits = [self.layout, f"vary-{self.vary}", "dyn" if self.dynamic else "static", f"L{self.layers}",
                f"h{self.hidden}", self.norm, attn, ffn]
        bits += ["item"] if self.host_sync else []
        bits += [f"break-{self.graph_break}"] if self.graph_break else []
        bits += ["growing"] if self.growing and self.attn == "cache_cat" else []
        bits += ["longres"] if self.long_residual else []
        bits += ["gate"] if self.attn_gate and self.attn != "none" else []
        bits += ["qknorm"] if self.qk_norm and self.attn != "none" else []
        bits += ["squeeze"] if self.squeeze and self.attn != "none" else []
        bits += [f"out-{self.out_kind}" + "".join("+" + e for e in self.out_extras)]
        return " ".join(bits)


def draw_spec(seed: int, dtype: torch.dtype = torch.float32) -> Spec:
    rng = random.Random(seed)
    layout = rng.choice(["flat", "flat", "bsh"])
    vary = "tokens" if layout == "flat" else rng.choice(["batch", "seq"])
    dynamic = rng.random() < 0.7
    head_dim = rng.choice([8, 16])
    hidden = rng.choice([32, 48, 64])
    heads = hidden // head_dim
    kv_heads = heads // 2 if heads % 2 == 0 and rng.random() < 0.4 else heads
    attn = rng.choice(["none", "self_sdpa", "self_matmul", "cache_cat", "cache_cat", "cache_inplace",
                       "cache_inplace"])
    cache_where = "input" if vary == "batch" else rng.choice(["input", "buffer"])  # a buffer has one batch
    moe_spellings = ["loop_where", "loop_nonzero", "gather_bmm", "sorted_bmm", "dense_mask"]
    if dtype == torch.bfloat16:
        moe_spellings += ["grouped_mm", "grouped_mm"]
    ffn = rng.choice(["linear", "swiglu", "moe", "moe"])
    out_kind = rng.choice(["single", "tuple", "dict"])
    extras = tuple(e for e in ("view", "slice", "input", "prenorm") if rng.random() < 0.35)
    moe = rng.choice(moe_spellings)
    loop = moe.startswith("loop")
    # a loop without captured dynamic shapes breaks the graph once per expert: few experts keep it cheap
    experts = rng.choice([2, 3] if loop else [3, 4, 6])
    dyn_capture = rng.random() < (0.7 if loop else 0.4)
    spec = Spec(
        seed=seed, dtype=dtype, layout=layout, vary=vary, dynamic=dynamic, hidden=hidden, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, layers=rng.choice([1, 1, 2, 2, 2, 3, 4]),
        norm=rng.choice(["rms_fn", "rms_manual", "gemma"]), attn=attn,
        attn_spelling=rng.choice(["sdpa", "matmul"]), cache_where=cache_where,
        cache_write=rng.choice(["index_copy", "slice"]), slice_start=rng.randint(0, MAX_SLOTS - 12),
        cache_len=rng.randint(3, 9), growing=dynamic and rng.random() < 0.5, rope=rng.random() < 0.5,
        ffn=ffn, moe=moe, experts=experts, top_k=rng.choice([1, 2, min(3, experts)]),
        renorm=rng.random() < 0.5, host_sync=rng.random() < 0.2,
        graph_break=rng.choice(["", "", "mid", "end"]), dyn_capture=dyn_capture,
        long_residual=rng.random() < 0.4, out_kind=out_kind, out_extras=_extras_for(out_kind, extras),
        fixed=rng.choice([2, 3, 4]),
    )
    # drawn last, so adding them left every earlier choice of a seed as it was
    return dataclasses.replace(spec, attn_gate=rng.random() < 0.4, squeeze=layout == "flat" and rng.random() < 0.15,
                               qk_norm=rng.random() < 0.5)


def _extras_for(out_kind: str, extras: Tuple[str, ...]) -> Tuple[str, ...]:
    """A single output is at most one view of the result (returning only the input would let Dynamo drop
    the whole model)."""
    if out_kind != "single":
        return extras
    return tuple(e for e in extras if e in ("view", "slice"))[:1]


# ---- blocks ------------------------------------------------------------------------------------------

def _param(gen: torch.Generator, *shape: int, scale: Optional[float] = None) -> nn.Parameter:
    scale = scale if scale is not None else shape[-2] ** -0.5 if len(shape) > 1 else 0.1
    return nn.Parameter(torch.randn(*shape, generator=gen) * scale, requires_grad=False)


class Norm(nn.Module):
    def __init__(self, gen: torch.Generator, dim: int, kind: str):
        super().__init__()
        self.kind, self.eps = kind, 1e-6
        # gemma stores w - 1; the others store w near 1
        self.weight = _param(gen, dim, scale=0.1)
        if kind != "gemma":
            self.weight.data += 1.0

    def forward(self, x):
        if self.kind == "rms_fn":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if self.kind == "rms_manual":
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class Ffn(nn.Module):
    def __init__(self, gen: torch.Generator, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        inter = hidden * 2
        self.up = _param(gen, inter * (2 if kind == "swiglu" else 1), hidden)
        self.down = _param(gen, hidden, inter)

    def forward(self, x):
        h = F.linear(x, self.up)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return F.linear(h, self.down)


class MoE(nn.Module):
    """Softmax top-k router; experts are SwiGLU, spelled one of several ways."""

    def __init__(self, gen: torch.Generator, hidden: int, spec: Spec):
        super().__init__()
        self.spelling, self.k, self.renorm, self.e = spec.moe, spec.top_k, spec.renorm, spec.experts
        inter = 16 if hidden <= 32 else 32
        self.router = _param(gen, self.e, hidden, scale=hidden ** -0.5 * 2)  # spread logits: fewer near-ties
        self.w_up = _param(gen, self.e, hidden, 2 * inter)  # [E, K, N]: _grouped_mm's layout
        self.w_down = _param(gen, self.e, inter, hidden)

    def route(self, x):
        probs = F.linear(x, self.router).float().softmax(-1)
        w, ids = probs.topk(self.k, dim=-1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), ids

    @staticmethod
    def act(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def expert(self, x, e: int):
        return self.act(x @ self.w_up[e]) @ self.w_down[e]

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, ids = self.route(x)
        return getattr(self, "_" + self.spelling)(x, w, ids).view(shape)

    def _loop_where(self, x, w, ids):
        out = torch.zeros_like(x)
        for e in range(self.e):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self.expert(x[tok], e) * w[tok, slot].unsqueeze(-1))
        return out

    def _loop_nonzero(self, x, w, ids):
        out = torch.zeros_like(x)
        for e in range(self.e):
            hit = ids == e
            rows = hit.any(-1).nonzero().view(-1)
            we = (w * hit).sum(-1)[rows]
            out = out.index_add(0, rows, self.expert(x[rows], e) * we.unsqueeze(-1))
        return out

    def _gather_bmm(self, x, w, ids):
        n, h = x.shape
        xk = x.unsqueeze(1).expand(n, self.k, h).reshape(n * self.k, 1, h)
        up = torch.bmm(xk, self.w_up[ids.reshape(-1)])
        y = torch.bmm(self.act(up), self.w_down[ids.reshape(-1)]).view(n, self.k, h)
        return (y * w.unsqueeze(-1)).sum(1)

    def _sorted(self, x, w, ids, grouped: bool):
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        ends = torch.bincount(flat, minlength=self.e).cumsum(0)
        rows = order // self.k
        xs = x[rows]
        if grouped:
            offs = ends.to(torch.int32)
            y = torch._grouped_mm(self.act(torch._grouped_mm(xs, self.w_up, offs=offs)), self.w_down, offs=offs)
        else:  # the same data flow with the expert of each sorted row looked up from the offsets
            expert_of = torch.searchsorted(ends, torch.arange(xs.shape[0], device=x.device), right=True)
            up = torch.bmm(xs.unsqueeze(1), self.w_up[expert_of])
            y = torch.bmm(self.act(up), self.w_down[expert_of])[:, 0]  # (squeeze is the attention's feature)
        y = y * w.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, rows, y)

    def _sorted_bmm(self, x, w, ids):
        return self._sorted(x, w, ids, grouped=False)

    def _grouped_mm(self, x, w, ids):
        return self._sorted(x, w, ids, grouped=True)

    def _dense_mask(self, x, w, ids):
        combine = torch.zeros(x.shape[0], self.e, dtype=x.dtype, device=x.device).scatter(1, ids, w)
        every = torch.stack([self.expert(x, e) for e in range(self.e)])  # [E, N, H]
        return torch.einsum("ne,enh->nh", combine, every)


def attend(q, k, v, spelling: str, causal: bool):
    """q [B, nh, S, d] over k/v [B, nkv, L, d]; causal only when L == S."""
    if spelling == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.float().softmax(-1).to(q.dtype) @ v


def rotate(x, cos, sin):
    """Partial neox rotary on the first 2 * cos.shape[-1] channels."""
    half = cos.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, gen: torch.Generator, spec: Spec):
        super().__init__()
        self.spec = spec
        self.nh, self.nkv, self.d = spec.heads, spec.kv_heads, spec.head_dim
        self.q_width = self.nh * self.d * (2 if spec.attn_gate else 1)
        self.qkv = _param(gen, self.q_width + 2 * self.nkv * self.d, spec.hidden)
        self.o = _param(gen, spec.hidden, self.nh * self.d)
        if spec.qk_norm:
            self.q_norm, self.k_norm = Norm(gen, self.d, spec.norm), Norm(gen, self.d, spec.norm)
        if spec.rope:
            rot = self.d // 2  # partial: half of each head rotates
            inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
            ang = torch.arange(64).float()[:, None] * inv[None, :]
            self.register_buffer("cos_sin_cache", torch.cat([ang.cos(), ang.sin()], dim=-1))
        if spec.attn == "cache_inplace" and spec.cache_where == "buffer":
            self.register_buffer("cache", torch.randn(1, MAX_SLOTS, 2 * self.nkv * self.d, generator=gen))

    def forward(self, h, pos, kv, slots):
        """h is [tokens, hidden] (flat: projections stay 2-D, as in vLLM) or [batch, seq, hidden]."""
        lead = h.shape[:-1]
        b, s = (1, lead[0]) if h.dim() == 2 else lead
        q, k, v = F.linear(h, self.qkv).split([self.q_width, self.nkv * self.d, self.nkv * self.d], dim=-1)
        gate = None
        if self.spec.attn_gate:
            q, gate = q.view(*lead, self.nh, 2 * self.d).chunk(2, dim=-1)
        q = q.reshape(b, s, self.nh, self.d).transpose(1, 2)
        k = k.view(b, s, self.nkv, self.d).transpose(1, 2)
        v = v.view(b, s, self.nkv, self.d).transpose(1, 2)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.spec.rope:
            cos, sin = self.cos_sin_cache.index_select(0, pos.reshape(-1)).view(b, 1, s, -1).to(h.dtype).chunk(2, -1)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = self.attend(q, k, v, kv, slots).transpose(1, 2).reshape(b, s, self.nh * self.d)
        if h.dim() == 2:  # back to [tokens, ...]
            out = out.squeeze(0) if self.spec.squeeze else out[0]
        if gate is not None:
            out = out * torch.sigmoid(gate.reshape(*lead, self.nh * self.d))
        return F.linear(out, self.o)

    def attend(self, q, k, v, kv, slots):
        kind = self.spec.attn
        if kind in ("self_sdpa", "self_matmul"):
            return attend(q, k, v, "sdpa" if kind == "self_sdpa" else "matmul", causal=True)
        if kind == "cache_cat":
            return attend(q, torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2), self.spec.attn_spelling,
                          causal=False)
        k, v = self.inplace_cache(kv, slots, k, v)
        return attend(q, k, v, self.spec.attn_spelling, causal=False)

    def inplace_cache(self, cache, slots, k, v):
        """Write the new k/v into the cache in place, then read the whole cache back."""
        if cache is None:
            cache = self.cache
        b, _, s, _ = k.shape
        new = torch.cat([k, v], dim=1).transpose(1, 2).reshape(b, s, 2 * self.nkv * self.d)
        if self.spec.cache_write == "index_copy":
            cache.index_copy_(1, slots, new)
        else:
            start = self.spec.slice_start
            cache[:, start:start + s] = new
        kv = cache.view(b, MAX_SLOTS, 2 * self.nkv, self.d).transpose(1, 2)
        return kv[:, :self.nkv], kv[:, self.nkv:]


class HostSync(nn.Module):
    def forward(self, h):
        peak = h.abs().amax().item()  # the host reads a value: capture cannot contain this
        return h * (2.0 / (1.0 + peak))


class Layer(nn.Module):
    """Pre-norm attention and FFN; every layer of a model has the same code, so a graph break inside
    compiles one graph that every layer shares with its own weights."""

    def __init__(self, gen: torch.Generator, spec: Spec):
        super().__init__()
        self.graph_break = spec.graph_break
        self.attn_norm = Norm(gen, spec.hidden, spec.norm) if spec.attn != "none" else None
        self.attn = Attention(gen, spec) if spec.attn != "none" else None
        self.sync = HostSync() if spec.host_sync else None
        self.ffn_norm = Norm(gen, spec.hidden, spec.norm)
        self.ffn = MoE(gen, spec.hidden, spec) if spec.ffn == "moe" else Ffn(gen, spec.hidden, spec.ffn)

    def forward(self, h, pos, kv, slots):
        if self.attn is not None:
            h = h + self.attn(self.attn_norm(h), pos, kv, slots)
        if self.graph_break == "mid":
            torch._dynamo.graph_break()
        if self.sync is not None:
            h = self.sync(h)
        h = h + self.ffn(self.ffn_norm(h))
        if self.graph_break == "end":
            torch._dynamo.graph_break()
        return h


class FuzzModel(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        gen = torch.Generator().manual_seed(spec.seed)
        self.spec = spec
        self.layers = nn.ModuleList(Layer(gen, spec) for _ in range(spec.layers))
        self.final_norm = Norm(gen, spec.hidden, spec.norm)
        if spec.long_residual:
            self.res_scale = _param(gen, spec.hidden, scale=0.5)

    def forward(self, x, pos=None, kv=None, slots=None):
        r0 = x * self.res_scale if self.spec.long_residual else None
        h = self.run_layers(x, pos, kv, slots)
        if r0 is not None:
            h = h + r0
        return self.outputs(x, h, self.final_norm(h))

    def run_layers(self, h, pos, kv, slots):
        # a method of its own: Dynamo skips a whole frame whose loop holds a graph break, and the code
        # around the loop (long residual, final norm, outputs) must stay compiled
        for i, layer in enumerate(self.layers):
            h = layer(h, pos, kv[i] if kv is not None else None, slots)
        return h

    def outputs(self, x, prenorm, out):
        made = {"out": out}
        for e in self.spec.out_extras:
            if e == "view":
                made["view"] = out.view(*out.shape[:-1], self.spec.heads, -1)
            elif e == "slice":
                made["slice"] = out[..., : self.spec.hidden // 2]
            elif e == "input":
                made["input"] = x
            else:
                made["prenorm"] = prenorm
        if self.spec.out_kind == "dict":
            return made
        if self.spec.out_kind == "tuple":
            return tuple(made.values())
        return made[self.spec.out_extras[0]] if self.spec.out_extras else out


# ---- cases: a model, its call schedule and its inputs --------------------------------------------------

@dataclasses.dataclass
class Case:
    spec: Spec
    device: str
    schedule: List[int]  # the varying size, per call

    def build(self) -> FuzzModel:
        """A fresh model: the same weights and buffers every time (seeded)."""
        return FuzzModel(self.spec).to(device=self.device, dtype=self.spec.dtype).eval()

    def inputs(self, call: int) -> tuple:
        """The inputs of call `call`: fresh random values (never zeros), deterministic by seed and call."""
        s, size = self.spec, self.schedule[call]
        gen = torch.Generator().manual_seed(s.seed * 7919 + call)
        b, t = self.batch_and_seq(size)
        shape = (t, s.hidden) if s.layout == "flat" else (b, t, s.hidden)
        x = torch.randn(*shape, generator=gen)
        pos = torch.randint(0, 64, (t,) if s.layout == "flat" else (b, t), generator=gen) if s.rope else None
        kv = slots = None
        if s.attn == "cache_cat":
            length = s.cache_len + (call if s.growing else 0)
            kv = [[torch.randn(b, s.kv_heads, length, s.head_dim, generator=gen) for _ in range(2)]
                  for _ in range(s.layers)]
        elif s.attn == "cache_inplace":
            slots = torch.randperm(MAX_SLOTS, generator=gen)[:t]
            if s.cache_where == "input":
                kv = [torch.randn(b, MAX_SLOTS, 2 * s.kv_heads * s.head_dim, generator=gen) for _ in range(s.layers)]
        return pytree.tree_map(self._place, (x, pos, kv, slots))

    def batch_and_seq(self, size: int) -> Tuple[int, int]:
        s = self.spec
        if s.layout == "flat":
            return 1, size
        return (size, s.fixed) if s.vary == "batch" else (1, size)

    def _place(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(self.device)
        return t.to(self.spec.dtype) if t.is_floating_point() else t

    def describe(self) -> str:
        return f"seed {self.spec.seed}: {self.spec.short()}; sizes {self.schedule}"


def make_schedule(seed: int, capture_sizes: Sequence[int] = CAPTURE_SIZES) -> List[int]:
    """An exact capture size, one that needs padding and one above the largest, 3 calls each, then
    the exact and padded sizes again (a replay after other sizes ran)."""
    rng = random.Random(seed * 31 + 1)
    sizes = sorted(capture_sizes)
    exact = rng.choice([n for n in sizes if n > 1] or sizes)
    padded_choices = [n for n in range(1, sizes[-1]) if n not in sizes]
    padded = rng.choice(padded_choices) if padded_choices else exact
    above = sizes[-1] + rng.randint(1, 4)
    return [exact] * 3 + [padded] * 3 + [above] * 3 + [exact, padded]


def generate(seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
             capture_sizes: Sequence[int] = CAPTURE_SIZES) -> Case:
    return Case(draw_spec(seed, dtype), device, make_schedule(seed, capture_sizes))


# ---- evidence: the built model really has the features its spec claims --------------------------------

class _CallLog(TorchFunctionMode):
    """The torch functions a run calls, each with the ids of the tensors it was given."""

    def __init__(self):
        super().__init__()
        self.args: Dict[str, set] = {}

    @property
    def names(self) -> set:
        return set(self.args)

    def given(self, name: str, t: torch.Tensor) -> bool:
        return id(t) in self.args.get(name, ())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        ids = self.args.setdefault(getattr(func, "__name__", str(func)), set())
        ids.update(id(a) for a in pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def evidence(case: Case) -> List[str]:
    """The features seen when the model runs eagerly (calls made, shapes, outputs), independent of the
    spec's own list: a feature the generator claims but never builds shows up as missing."""
    model = case.build()
    log, breaks = _CallLog(), []
    real_break = torch._dynamo.graph_break
    torch._dynamo.graph_break = lambda *a, **k: breaks.append(1)
    try:
        args0, args1 = case.inputs(0), case.inputs(len(case.schedule) - 3)
        with log, torch.no_grad():
            out = model(*args0)
    finally:
        torch._dynamo.graph_break = real_break
    return sorted(_op_features(log, model, args0) | _shape_features(case, args0, args1) |
                  _output_features(out, args0[0], case.spec.hidden) | ({"graph_break"} if breaks else set()))


def _op_features(log: _CallLog, model: FuzzModel, args) -> set:
    n, spec, f = log.names, model.spec, set()
    if "rms_norm" in n:
        f.add("norm_rms_fn")
    if "rsqrt" in n and "pow" in n:  # gemma reads its weight in float32 for 1 + w
        gemma = any(log.given("float", m.weight) for m in model.modules() if isinstance(m, Norm))
        f.add("norm_gemma" if gemma else "norm_rms_manual")
    swiglu = any(isinstance(m, Ffn) and m.kind == "swiglu" for m in model.modules())
    f |= {"ffn_swiglu"} if swiglu and "silu" in n else set()
    f |= {"ffn_linear"} if "gelu" in n else set()
    attn = next((m for m in model.modules() if isinstance(m, Attention)), None)
    if attn is not None:
        f |= _attention_features(log, attn, args)
    f |= _moe_features(n)
    f |= {"host_sync_item"} if "item" in n else set()
    f |= {"long_residual"} if spec.long_residual and log.given("mul", model.res_scale) else set()
    f |= {"dyn_shape_capture"} if spec.dyn_capture else set()  # a Dynamo setting, applied by the harness
    f |= {"out_squeeze"} if "squeeze" in n else set()  # the model's only squeeze
    return f


def _attention_features(log: _CallLog, attn: Attention, args) -> set:
    n, f = log.names, set()
    _, _, kv, _ = args
    causal = attn.spec.attn.startswith("self")
    if "scaled_dot_product_attention" in n:
        f.add("attn_self_sdpa" if causal else "")
    if "masked_fill" in n and "matmul" in n and causal:
        f.add("attn_self_matmul")
    if isinstance(kv, list) and isinstance(kv[0], list) and log.given("cat", kv[0][0]):
        f.add("attn_cache_cat")
    if "index_copy_" in n:
        f.add("cache_index_copy")
    if "__setitem__" in n:
        f.add("cache_slice_assign")
    if "index_copy_" in n or "__setitem__" in n:
        f.add("attn_cache_inplace_input" if isinstance(kv, list) else "attn_cache_inplace_buffer")
    if attn.nkv < attn.nh:
        f.add("gqa")
    if "sigmoid" in n and "chunk" in n:
        f.add("attn_gate")
    if hasattr(attn, "q_norm") and any(log.given(name, attn.q_norm.weight) for name in ("rms_norm", "mul", "float")):
        f.add("qk_norm")
    if "index_select" in n and hasattr(attn, "cos_sin_cache"):
        f.add("rope")
    return f - {""}


def _moe_features(n: set) -> set:
    if "topk" not in n:
        return set()
    if "_grouped_mm" in n:
        return {"moe_grouped_mm"}
    if "bincount" in n and "searchsorted" in n:
        return {"moe_sorted_bmm"}
    if "where" in n and "index_add_" in n:
        return {"moe_loop_where"}
    if "nonzero" in n:
        return {"moe_loop_nonzero"}
    if "einsum" in n:
        return {"moe_dense_mask"}
    if "bmm" in n:
        return {"moe_gather_bmm"}
    return set()


def _shape_features(case: Case, args0, args1) -> set:
    x0, x1 = args0[0], args1[0]
    f = {"layout_flat" if x0.dim() == 2 else "layout_bsh", "dynamic" if case.spec.dynamic else "static"}
    if x0.dim() == 2:
        f.add("vary_tokens")
    else:
        f.add("vary_batch" if x0.shape[0] != x1.shape[0] else "vary_seq")
    kv0, kv1 = args0[2], args1[2]
    if isinstance(kv0, list) and isinstance(kv0[0], list) and kv0[0][0].shape[2] != kv1[0][0].shape[2]:
        f.add("cache_growing")
    return f


def _output_features(out, x, hidden: int) -> set:
    """Container kind, and which leaves are the input itself, a [.., heads, head_dim] view or a half-width slice."""
    f = {"out_dict" if isinstance(out, dict) else "out_tuple" if isinstance(out, tuple) else "out_single"}
    for t in pytree.tree_leaves(out):
        if t is x:
            f.add("out_input_alias")
        elif t.dim() == x.dim() + 1 and t._base is not None:
            f.add("out_view")
        elif t.shape[-1] == hidden // 2 and not t.is_contiguous():
            f.add("out_slice")
    return f


# ---- running a case ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Divergence:
    seed: int
    mode: str
    size: int
    call: int
    output: str  # output index, "cache[i]" for a mutated input, "-" for an error
    kind: str  # value | nan | shape | structure | held | mutation | error | refused (a clear error by contract)
    error: float
    detail: str = ""

    def line(self) -> str:
        err = f"{self.error:.3e}" if math.isfinite(self.error) else str(self.error)
        return (f"seed {self.seed} mode {self.mode} size {self.size} call {self.call} output {self.output}: "
                f"{self.kind} err {err}{' ' + self.detail if self.detail else ''}")


@dataclasses.dataclass
class CaseResult:
    case: Case
    divergences: List[Divergence]
    seconds: float
    counters: Dict[str, Dict[str, int]]  # mode -> summed runtime counters
    graphs: Dict[str, int]  # mode -> graphs compiled
    untraced: int = 0  # frames Dynamo could not trace under serving shapes (they ran eagerly)

    def failed_modes(self) -> List[str]:
        return sorted({d.mode for d in self.wrong()}, key=MODES.index)

    def wrong(self) -> List[Divergence]:
        """Divergences other than the runtime's documented refusals (a clear error, never a wrong value)."""
        return [d for d in self.divergences if d.kind != "refused"]

    def refused(self) -> bool:
        return any(d.kind == "refused" for d in self.divergences)


class _MoeInputHook:
    """A forward pre-hook on every MoE layer of `model` while inside `with`; subclasses say what it does."""

    def __init__(self, model: nn.Module):
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.hooks = []

    def __enter__(self):
        self.hooks = [m.register_forward_pre_hook(self.on_input) for m in self.moes]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def on_input(self, module, args):
        raise NotImplementedError


class MoeInputs(_MoeInputHook):
    """Records each MoE layer's input rows while a model runs (`with MoeInputs(model) as seen:`)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.rows: List[torch.Tensor] = []

    def on_input(self, module, args) -> None:
        self.rows.append(args[0].detach().reshape(-1, args[0].shape[-1]))


def moe_input_errors(eager: MoeInputs, exact: MoeInputs) -> List[float]:
    """Eager's relative error at each MoE layer's input, per token, median over tokens (one token whose
    experts flipped does not set the level for the rest)."""
    errs = []
    for x, x64 in zip(eager.rows, exact.rows):
        per_token = (x.double() - x64).norm(dim=-1) / x64.norm(dim=-1).clamp_min(1e-30)
        errs.append(per_token.median().item())
    return errs


class PerturbedMoeInputs(_MoeInputHook):
    """Multiplies each MoE layer's input by (1 + level * N(0, 1)), the level of that layer given: the
    same maths rounded otherwise, as accurately as eager."""

    def __init__(self, model: nn.Module, levels: Sequence[float], gen: torch.Generator):
        super().__init__(model)
        self.levels, self.gen, self.at = list(levels), gen, 0

    def on_input(self, module, args):
        x = args[0]
        level = self.levels[self.at] if self.at < len(self.levels) else 0.0
        self.at += 1
        noise = torch.randn(x.shape, generator=self.gen, dtype=torch.float32).to(x.device)
        return ((x.float() * (1 + level * noise)).to(x.dtype),) + tuple(args[1:])


class FlippedTies:
    """While inside `with`, every MoE layer of `model` routes each token whose k-th and (k+1)-th router logits
    are within TIE_ULPS ulps to the runner-up instead of the k-th expert; `flipped` counts those tokens."""

    def __init__(self, model: nn.Module):
        self.moes = [m for m in model.modules() if isinstance(m, MoE)]
        self.flipped = 0

    def __enter__(self):
        for m in self.moes:
            m.route = functools.partial(self.route, m)
        return self

    def __exit__(self, *exc) -> None:
        for m in self.moes:
            del m.route

    def route(self, moe: "MoE", x):
        if moe.k >= moe.e:
            return MoE.route(moe, x)
        logits = F.linear(x, moe.router)
        w, ids = logits.float().softmax(-1).topk(moe.k + 1, dim=-1)
        ranked = logits.float().gather(-1, ids)
        kth, runner_up = ranked[:, moe.k - 1], ranked[:, moe.k]
        ulp = torch.finfo(logits.dtype).eps * torch.exp2(torch.floor(torch.log2(kth.abs().clamp_min(1e-30))))
        tie = (kth - runner_up) <= TIE_ULPS * ulp
        self.flipped += int(tie.sum())
        last = moe.k - 1
        w[tie, last], ids[tie, last] = w[tie, moe.k], ids[tie, moe.k]
        w, ids = w[:, :moe.k], ids[:, :moe.k]
        if moe.renorm:
            w = w / w.sum(-1, keepdim=True)
        return w.to(x.dtype), ids


def _distance(got: list, want: list) -> float:
    return max((rel_error(g, w) for g, w in zip(got, want) if isinstance(w, torch.Tensor) and w.is_floating_point()),
               default=0.0)


def tie_flip_spread(before: nn.Module, args_of: Callable[[], tuple], want: list) -> float:
    """How far eager moves with its near-tied routing decided the other way (0 when nothing is near a tie)."""
    model = copy.deepcopy(before)
    args = args_of()
    with torch.no_grad(), FlippedTies(model) as flips:
        out = model(*args)
    if not flips.flipped:
        return 0.0
    return _distance(pytree.tree_leaves(out) + _mutables(args) + _cache_buffers(model), want)


def rounding_spread(before: nn.Module, args_of: Callable[[], tuple], want: list, levels: Sequence[float],
                    seed: int) -> float:
    """The largest relative change of any output or written cache when eager (`before`: the model as it
    was before the call) runs again with its MoE inputs perturbed at `levels`, ROUNDING_SAMPLES times, and
    once with its near-tied routing flipped (`tie_flip_spread`)."""
    spread = 0.0
    for sample in range(ROUNDING_SAMPLES):
        model = copy.deepcopy(before)
        args = args_of()
        with torch.no_grad(), PerturbedMoeInputs(model, levels, torch.Generator().manual_seed(seed + sample)):
            out = model(*args)
        spread = max(spread, _distance(pytree.tree_leaves(out) + _mutables(args) + _cache_buffers(model), want))
    return max(spread, tie_flip_spread(before, args_of, want))


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf for NaN/inf where the reference is finite."""
    g, w = got.double(), want.double()
    if not torch.isfinite(g).all():
        return math.inf
    denom = w.norm().item()
    return (g - w).norm().item() / denom if denom > 0 else (g - w).norm().item()


class Reference:
    """Eager's outputs and post-call mutable inputs for every call of a case and, in bf16, what the
    tolerance is widened from: eager's error against float64 and `rounding_spread`."""

    def __init__(self, case: Case):
        self.case = case
        model = case.build()
        self.calls = []
        self.eager_err: List[float] = []
        self.spread: List[float] = []
        model64 = self._float64_copy(case) if case.spec.dtype != torch.float32 else None
        for call in range(len(case.schedule)):
            args = case.inputs(call)
            before = copy.deepcopy(model) if model64 is not None else None  # the cache buffers as they were
            with torch.no_grad(), MoeInputs(model) as seen:
                out = model(*args)
            self.calls.append((_detach_clone(out), _mutables(args) + _cache_buffers(model)))
            if model64 is None:
                self.eager_err.append(0.0)
                self.spread.append(0.0)
                continue
            err, levels = self._against_float64(model64, call, out, seen)
            self.eager_err.append(err)
            want = pytree.tree_leaves(self.calls[-1][0]) + self.calls[-1][1]
            self.spread.append(rounding_spread(before, lambda c=call: case.inputs(c), want, levels,
                                               case.spec.seed * 7919 + call) if seen.moes else 0.0)

    @staticmethod
    def _float64_copy(case: Case):
        # _grouped_mm has no float64 kernel: the reference takes the same sorted rows through bmm
        spec = case.spec if case.spec.moe != "grouped_mm" else dataclasses.replace(case.spec, moe="sorted_bmm")
        return FuzzModel(spec).to(device=case.device, dtype=torch.float64).eval()

    def _against_float64(self, model64, call: int, out, seen: MoeInputs) -> Tuple[float, List[float]]:
        """Eager's error against the float64 model, and eager's error at each MoE layer's input."""
        args = pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                               self.case.inputs(call))
        with torch.no_grad(), MoeInputs(model64) as seen64:
            want = model64(*args)
        errs = [rel_error(g.double(), w) for g, w in zip(pytree.tree_leaves(out), pytree.tree_leaves(want))]
        return max(errs, default=0.0), moe_input_errors(seen, seen64)

    def tolerance(self, call: int) -> float:
        if self.case.spec.dtype == torch.float32:
            return FP32_TOL
        return max(BF16_TOL, 3 * self.eager_err[call], SPREAD_FACTOR * self.spread[call])


def _detach_clone(tree):
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def _cache_buffers(model: nn.Module) -> List[torch.Tensor]:
    """Copies of the in-place cache buffers (written by the model, read back by later calls)."""
    return [b.detach().clone() for name, b in model.named_buffers() if name.endswith(".cache")]


def _mutables(args) -> List[torch.Tensor]:
    """The inputs a model may write in place: in-place cache tensors (a list of tensors, not of lists)."""
    kv = args[2]
    if isinstance(kv, list) and kv and isinstance(kv[0], torch.Tensor):
        return [t.detach().clone() for t in kv]
    return []


def compile_model(model: nn.Module, case: Case, mode: str, capture_sizes: Sequence[int], **options):
    """The model compiled with the kunlun backend in `mode`; returns (compiled, backend)."""
    import kunlun_compile as kc

    options = dict(strict=True, graph_mode=mode, capture_sizes=list(capture_sizes), **options)
    if case.spec.dynamic:
        compiled = kc.compile(model, dynamic=True, **options)
        return compiled, compiled.kunlun_backend
    be = kc.backend(**options)
    return torch.compile(model, backend=be, dynamic=False), be


class _ModeRun:
    """One graph mode over a case's schedule: compares each call, then re-checks every held output."""

    def __init__(self, case: Case, ref: Reference, mode: str, compiled: Callable, model: nn.Module):
        self.case, self.ref, self.mode, self.compiled, self.model = case, ref, mode, compiled, model
        self.held: List[Tuple[int, list, list]] = []  # (call, outputs as returned, their values then)
        self.found: List[Divergence] = []
        self.untraced = 0  # frames Dynamo could not trace under serving shapes (they ran eagerly)

    def div(self, call: int, output: str, kind: str, error: float, detail: str = "") -> None:
        self.found.append(Divergence(self.case.spec.seed, self.mode, self.case.schedule[call], call, output, kind,
                                     error, detail))

    def run(self) -> List[Divergence]:
        for call in range(len(self.case.schedule)):
            args = self.case.inputs(call)
            frames = _frame_failures()
            try:
                with torch.no_grad():
                    out = self.compiled(*args)
            except SizeAssumptionBroken as e:  # the runtime's documented refusal, never a wrong result
                self.div(call, "-", "refused", math.inf, _one_line(e))
                break
            except Exception as e:  # noqa: BLE001 - a failing call is a finding, not a crash of the fuzzer
                self.div(call, "-", "error", math.inf, _one_line(e))
                break
            failed, reasons = (after - before for after, before in zip(_frame_failures()[:2], frames[:2]))
            if failed > reasons:  # given up without a tracer's reason: a (strict) backend raised, suppressed
                self.div(call, "-", "error", math.inf, "a frame failed to compile and ran eagerly")
            from kunlun_compile.capture.dynamic import untraceable_reasons

            self.untraced += len(untraceable_reasons(frames[2]))
            self.compare(call, out, args)
            self.check_held(call)
            leaves = pytree.tree_leaves(out)
            self.held.append((call, leaves, [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves]))
        return self.found

    def compare(self, call: int, out, args) -> None:
        want, want_mut = self.ref.calls[call]
        tol = self.ref.tolerance(call)
        got_leaves, got_spec = pytree.tree_flatten(out)
        want_leaves, want_spec = pytree.tree_flatten(want)
        if got_spec != want_spec:
            self.div(call, "-", "structure", math.inf, f"{got_spec} != {want_spec}")
            return
        for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
            self.compare_tensor(call, str(i), g, w, tol, "value")
        for i, (g, w) in enumerate(zip(_mutables(args) + _cache_buffers(self.model), want_mut)):
            self.compare_tensor(call, f"cache[{i}]", g, w, tol, "mutation")

    def compare_tensor(self, call: int, name: str, g, w, tol: float, kind: str) -> None:
        if not isinstance(w, torch.Tensor):
            if g != w:
                self.div(call, name, kind, math.inf, f"{g!r} != {w!r}")
            return
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            self.div(call, name, "shape", math.inf, f"{_meta(g)} != {_meta(w)}")
            return
        if not w.is_floating_point():
            if not torch.equal(g, w):
                self.div(call, name, kind, math.inf, "integer values differ")
            return
        err = rel_error(g, w)
        if not err <= tol:  # NaN never passes
            why = (f" (eager vs float64 {self.ref.eager_err[call]:.1e}, rounding spread {self.ref.spread[call]:.1e})"
                   if self.case.spec.dtype != torch.float32 else "")
            self.div(call, name, "nan" if not math.isfinite(err) else kind, err, f"tol {tol:.2e}{why}")

    def check_held(self, call: int) -> None:
        """Outputs returned by earlier calls must be untouched by this one (a replay must not overwrite them)."""
        for earlier, leaves, then in self.held:
            for i, (t, v) in enumerate(zip(leaves, then)):
                if isinstance(t, torch.Tensor) and not torch.equal(t, v):
                    self.div(earlier, str(i), "held", rel_error(t, v), f"changed by call {call}")
        self.held = [(c, leaves, [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves])
                     for c, leaves, _ in self.held]  # report each overwrite once


def _frame_failures() -> Tuple[int, int, Dict[str, int]]:
    """(frames Dynamo gave up on, reasons it recorded, the reasons), process-wide."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return frames["total"] - frames["ok"], sum(counters["unimplemented"].values()), dict(counters["unimplemented"])


def _meta(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _one_line(e: BaseException) -> str:
    """The error in one line.  Dynamo's wrapped errors say only who raised on their first line: the
    wrapped error ("got RuntimeError(...)") or the line after "raised:" is the one that says why."""
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith("raised:"):
        lines = lines[1:]
    why = next((ln[ln.index("got "):] for ln in lines if "got " in ln and "Error(" in ln), "")
    head = lines[0] if lines else type(e).__name__
    return (head + (f" ({why})" if why else ""))[:400]


def _dynamo_settings(case: Case):
    settings = dict(recompile_limit=64, accumulated_recompile_limit=4096)
    if case.spec.dyn_capture:
        settings.update(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
    return torch._dynamo.config.patch(**settings)


def _summed_counters(be) -> Tuple[Dict[str, int], int]:
    total: Dict[str, int] = {}
    for g in be.report.graphs:
        for k, v in g.runtime.get("counters", {}).items():
            total[k] = total.get(k, 0) + v
    return total, len(be.report.graphs)


class ModeSwitch:
    """Every mode from one Dynamo trace and one AOT capture: each ATen graph is compiled by one kunlun
    backend per mode, and a call runs the current mode's.  The runtimes under test are the ones a
    separate compile per mode builds (same graph, same example inputs); only the tracing is shared,
    which is most of a CPU case's time."""

    def __init__(self, modes: Sequence[str], capture_sizes: Sequence[int], **options):
        import kunlun_compile as kc

        self.backends = {m: kc.backend(strict=True, graph_mode=m, capture_sizes=list(capture_sizes), **options)
                         for m in modes}
        self.mode = modes[0]

    def __call__(self, gm, example_inputs):
        from kunlun_compile.capture import to_aten_inference

        first = next(iter(self.backends.values()))
        # the backend changed shape: share Dynamo's trace only
        if not (hasattr(first, "_compile_aten") and hasattr(first, "_ids")):
            runs = {m: be(gm, example_inputs) for m, be in self.backends.items()}
            return self._dispatch(runs)
        return to_aten_inference(gm, example_inputs, self._compile_aten)

    def _compile_aten(self, gm, example_inputs):
        from kunlun_compile.utils import copy_graph_module

        runs = {m: be._compile_aten(f"graph_{next(be._ids)}", copy_graph_module(gm), example_inputs)
                for m, be in self.backends.items()}
        return self._dispatch(runs)

    def _dispatch(self, runs: Dict[str, Callable]) -> Callable:
        def run(*args):
            return runs[self.mode](*args)
        return run


def _shared_compile(case: Case, model: nn.Module, switch: ModeSwitch):
    if case.spec.dynamic:
        from kunlun_compile.capture import with_serving_shapes

        # as kunlun_compile.compile(dynamic=True) does for a user: a frame Dynamo cannot trace under
        # serving shapes runs eagerly (one warning); `_ModeRun` tells those apart from backend failures
        return with_serving_shapes(torch.compile(model, backend=switch, dynamic=True), fall_back=True)
    return torch.compile(model, backend=switch, dynamic=False)


def _reset_buffers(model: nn.Module, fresh: nn.Module) -> None:
    """Back to the built state, in place (captures read buffers at their addresses)."""
    with torch.no_grad():
        for b, f in zip(model.buffers(), fresh.buffers()):
            b.copy_(f)


def run_case(case: Case, modes: Sequence[str] = MODES, capture_sizes: Sequence[int] = CAPTURE_SIZES,
             compile_fn: Optional[Callable] = None, **options) -> CaseResult:
    """Every mode of one case against eager.  By default every mode shares one trace (`ModeSwitch`);
    `compile_fn(model, case, mode, capture_sizes, **options)` -> (compiled, backend or None) compiles each
    mode on its own instead (tests swap it to plant faults)."""
    t0 = time.perf_counter()
    found: List[Divergence] = []
    counters, graphs, untraced = {}, {}, [0]
    torch._dynamo.reset()
    with _op_references(case.device), _dynamo_settings(case), deterministic_torch(case.device):
        ref = Reference(case)
        if compile_fn is None:
            switch = ModeSwitch(modes, capture_sizes, **options)
            model = case.build()
            compiled = _shared_compile(case, model, switch)
        for mode in modes:
            if compile_fn is None:
                switch.mode = mode
                _reset_buffers(model, case.build())
                be = switch.backends[mode]
            else:
                torch._dynamo.reset()
                model = case.build()
                compiled, be = compile_fn(model, case, mode, capture_sizes, **options)
            found += _run_mode(case, ref, mode, compiled, model, untraced)
            if be is not None:
                counters[mode], graphs[mode] = _summed_counters(be)
    torch._dynamo.reset()
    return CaseResult(case, found, time.perf_counter() - t0, counters, graphs, untraced[0])


def _run_mode(case: Case, ref: Reference, mode: str, compiled: Callable, model: nn.Module,
              untraced: List[int]) -> List[Divergence]:
    try:
        run = _ModeRun(case, ref, mode, compiled, model)
        found = run.run()
        untraced[0] += run.untraced
        return found
    except Exception as e:  # noqa: BLE001 - outside a call (the harness's own checks): still a finding
        return [Divergence(case.spec.seed, mode, case.schedule[0], 0, "-", "error", math.inf, _one_line(e))]


@contextlib.contextmanager
def deterministic_torch(device: str):
    """On the GPU, torch's deterministic algorithms for eager and compiled alike.  The MoE spellings
    scatter back with `index_add_`, which on CUDA adds in bf16 by atomics in no fixed order: the same
    call run twice then differs by a rounding, and a router near a tie several layers on can pick other
    experts (seed 165: mode `none` against its own re-run, 2.8e-2 at one call).  With it on, a divergence
    is the runtime's, never the order of two atomics.  Uninitialised memory is left as it is: filling it
    would add kernels to the graphs under test."""
    if device == "cpu":
        yield
        return
    from torch.utils import deterministic

    was, was_warn, was_fill = (torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled(),
                               deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no such path warns, and runs
    deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        deterministic.fill_uninitialized_memory = was_fill


def _op_references(device: str):
    """On the CPU the kunlun:: ops run their torch references: the runtime is under test, not the kernels."""
    if device != "cpu":
        return contextlib.nullcontext()
    from kunlun_compile.ops import cpu_kernels

    return cpu_kernels(False)


# ---- command line ------------------------------------------------------------------------------------

def parse_seeds(text: str) -> List[int]:
    seeds: List[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def summary(results: Sequence[CaseResult], modes: Sequence[str]) -> str:
    lines = [f"{'seed':>5}  " + "  ".join(f"{m[:9]:>9}" for m in modes) + f"  {'s':>5}  replays  case"]
    for r in results:
        cells = []
        for m in modes:
            kinds = sorted({d.kind for d in r.divergences if d.mode == m})
            cells.append(f"{('FAIL:' + ','.join(k[:4] for k in kinds)) if kinds else 'ok':>9}")
        replays = sum(c.get("replays", 0) for c in r.counters.values())
        lines.append(f"{r.case.spec.seed:>5}  " + "  ".join(cells) + f"  {r.seconds:5.1f}  {replays:>7}  "
                     f"{r.case.spec.short()}")
    failing = [r for r in results if r.wrong()]
    runtime_only = [r for r in failing if "none" not in r.failed_modes()]
    unreplayed = [r for r in results if not sum(c.get("replays", 0) for c in r.counters.values())]
    lines.append(f"\n{len(failing)} of {len(results)} seeds diverge; "
                 f"{len(runtime_only)} only in graph modes (mode none matches eager)")
    lines.append("seeds refused with a clear error (SizeAssumptionBroken: a squeeze traced size-obliviously met "
                 "a size of 1): " + (",".join(str(r.case.spec.seed) for r in results if r.refused()) or "none"))
    lines.append("seeds with frames Dynamo could not trace under serving shapes (ran eagerly, one warning): "
                 + (",".join(str(r.case.spec.seed) for r in results if r.untraced) or "none"))
    lines.append(f"{len(unreplayed)} seeds never replayed a capture in any mode (ran without graphs): "
                 + (",".join(str(r.case.spec.seed) for r in unreplayed) or "none"))
    lines.append("failing seeds: " + (",".join(str(r.case.spec.seed) for r in failing) or "none"))
    for r in failing:
        lines.append(f"\n{r.case.describe()}")
        lines += ["  " + d.line() for d in _first_per_mode_kind(r.divergences)]
    return "\n".join(lines)


def _first_per_mode_kind(divs: Sequence[Divergence]) -> List[Divergence]:
    """The first divergence of each (mode, kind, output), so a report stays readable."""
    seen, out = set(), []
    for d in divs:
        key = (d.mode, d.kind, d.output)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-49", help="e.g. 0-49 or 3,7,10-12")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--capture-sizes", default=",".join(map(str, CAPTURE_SIZES)))
    p.add_argument("--check-replays", action="store_true", help="run with the runtime's replay checker on")
    p.add_argument("-v", "--verbose", action="store_true", help="print every divergence, not the first per kind")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == "cpu" else torch.bfloat16)
    modes = a.modes.split(",")
    sizes = [int(s) for s in a.capture_sizes.split(",")]
    options = {"check_replays": True} if a.check_replays else {}
    results = []
    for seed in parse_seeds(a.seeds):
        case = generate(seed, a.device, dtype, sizes)
        try:
            r = run_case(case, modes, sizes, **options)
        except Exception:  # noqa: BLE001 - the reference itself failed: a generator bug
            print(f"seed {seed}: eager reference failed\n{traceback.format_exc()}", file=sys.stderr)
            continue
        results.append(r)
        verdict = "FAIL " + ",".join(r.failed_modes()) if r.wrong() else "refused" if r.refused() else "ok"
        print(f"seed {seed}: {verdict} "
              f"({r.seconds:.1f} s)", file=sys.stderr, flush=True)
        if a.verbose:
            for d in r.divergences:
                print("  " + d.line(), file=sys.stderr)
    print(summary(results, modes))
    return 1 if any(r.wrong() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
