"""Decode-style attention prologues written by hand (as in tests/decode_stack.py): q and k per token
[tokens, heads, head_dim], a Q/K RMSNorm (torch's `F.rms_norm`, Gemma's `1 + w` or Llama's weight), and a
partial neox rotation written out in one `cat` with the passed-through rest, against half-width tables
[tokens, rotary_dim / 2] the caller looked up.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kunlun_compile as kc
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import rel_err

D, HALF = 32, 8


def rotate_with_rest(x, cos, sin):
    half = cos.shape[-1]
    front, back, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([front * cos - back * sin, back * cos + front * sin, rest], dim=-1)


class Prologue(nn.Module):
    def __init__(self, norm: str, shared_tables: bool = True):
        super().__init__()
        self.norm, self.shared_tables = norm, shared_tables
        scale, gen = 0.05 if norm == "gemma" else 0.3, torch.Generator().manual_seed(7)
        self.q_weight = nn.Parameter((0.0 if norm == "gemma" else 1.0) + scale * torch.randn(D, generator=gen))
        self.k_weight = nn.Parameter((0.0 if norm == "gemma" else 1.0) + scale * torch.randn(D, generator=gen))

    def head_norm(self, x, w):
        if self.norm == "gemma":  # torch's weightless norm in fp32, then `1 + w`, one rounding
            return (F.rms_norm(x.float(), (D,), eps=1e-6) * (1.0 + w.float())).to(x.dtype)
        xf = x.float()  # Llama's, written out
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def forward(self, qkv, cos, sin):
        tokens = qkv.shape[0]
        q, k = qkv.split([4 * D, 2 * D], dim=-1)
        if self.shared_tables:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q_tables = k_tables = (cos, sin)
        else:  # each rotation unsqueezes the tables itself
            q_tables = k_tables = None
        q = self.head_norm(q.view(tokens, 4, D), self.q_weight)
        k = self.head_norm(k.view(tokens, 2, D), self.k_weight)
        if q_tables is None:
            return (rotate_with_rest(q, cos.unsqueeze(1), sin.unsqueeze(1)),
                    rotate_with_rest(k, cos.unsqueeze(1), sin.unsqueeze(1)))
        return rotate_with_rest(q, *q_tables), rotate_with_rest(k, *k_tables)


def _inputs(dtype, tokens=5):
    g = torch.Generator().manual_seed(11)
    angles = torch.rand(tokens, HALF, generator=g) * 6.0
    return (torch.randn(tokens, 6 * D, generator=g).to(dtype), angles.cos().to(dtype), angles.sin().to(dtype))


def _run(model, inputs):
    torch._dynamo.reset()
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        want, got = model(*inputs), compiled(*inputs)
    graph = compiled.kunlun_backend.report.graphs[0]
    return got, want, graph.patterns.get("norm_rope_gate", 0), [m for p in graph.passes for m in p.near_misses]


@pytest.mark.parametrize("kernel", ["reference", "interpreted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", ["gemma", "llama"])
def test_per_token_norm_and_partial_rotation_fuse_into_one_kernel(norm, dtype, kernel):
    model = Prologue(norm).to(dtype).eval()
    inputs = _inputs(dtype)
    with cpu_kernels(kernel == "interpreted"):
        got, want, fused, misses = _run(model, inputs)
    assert fused == 1, misses
    with torch.no_grad():
        exact = model.double()(*(t.double() for t in inputs))
    for g, w, e in zip(got, want, exact):
        assert g.shape == w.shape and g.dtype == w.dtype
        if kernel == "reference":
            assert torch.equal(g, w)
        elif dtype == torch.float32:
            assert rel_err(g, w) < 1e-6
        else:  # the interpreter's float32 -> bf16 cast truncates: up to an ulp per rounding, not half
            assert rel_err(g, e) < 1.2e-2


class TwoLayers(nn.Module):
    """Tables unsqueezed once per rotation (tests/decode_stack.py), from one pair shared by both layers:
    each layer's q and k must be paired, never one layer's q with the next layer's k (which depends on it)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Prologue("gemma", shared_tables=False), Prologue("gemma", shared_tables=False)])
        self.mix = nn.Parameter(torch.randn(6 * D, 4 * D + 2 * D) / 12)

    def forward(self, qkv, cos, sin):
        q, k = self.layers[0](qkv, cos, sin)
        nxt = torch.cat([q.flatten(1), k.flatten(1)], -1) @ self.mix.t()
        q2, k2 = self.layers[1](nxt, cos, sin)
        return q2, k2, q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tables_unsqueezed_per_rotation_pair_each_layers_own_q_and_k(dtype):
    model = TwoLayers().to(dtype).eval()
    with cpu_kernels(False):
        got, want, fused, misses = _run(model, _inputs(dtype))
    assert fused == 2, misses
    for g, w in zip(got, want):
        assert torch.equal(g, w)


class LoneRotation(nn.Module):
    def forward(self, x, cos, sin):
        return rotate_with_rest(x.view(x.shape[0], -1, D), cos.unsqueeze(1), sin.unsqueeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_rotation_with_its_rest_in_one_cat_left_unfused_says_so_and_keeps_the_bits(dtype):
    """One rotated tensor, no Q/K pair for a prologue rule: the rotation is recognised, put back as its
    reference (the model's bits), and named in a near miss."""
    with cpu_kernels(False):
        got, want, fused, misses = _run(LoneRotation().eval(), _inputs(dtype))
    assert fused == 0
    assert any("passed-through rest in one cat over the first 16 dims" in m for m in misses), misses
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["gemma", "llama"])
def test_per_token_prologue_on_cuda(norm):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = Prologue(norm).to("cuda", torch.bfloat16).eval()
    inputs = tuple(t.cuda() for t in _inputs(torch.bfloat16, tokens=300))
    got, want, fused, misses = _run(model, inputs)
    assert fused == 1, misses
    with torch.no_grad():
        exact = model.double()(*(t.double() for t in inputs))
    for g, w, e in zip(got, want, exact):
        assert rel_err(g, e) <= max(2e-3, 1.25 * rel_err(w, e))


# ---- vLLM's rotation on q and k that come from anywhere (vLLM's Olmoe: a full-width Q/K norm first) ----------

class FullWidthNormThenRope(nn.Module):
    """vLLM's Olmoe attention: qkv split, RMSNorm over all of q's (k's) heads at once, then vLLM's
    `forward_native` rotation from `cos_sin_cache[positions]` -- neox halves or GPT-J pairs, full or partial."""

    def __init__(self, neox: bool, rotary_dim: int):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.neox, self.rotary_dim = neox, rotary_dim
        self.q_norm = nn.Parameter(1.0 + 0.2 * torch.randn(4 * D, generator=gen))
        self.k_norm = nn.Parameter(1.0 + 0.2 * torch.randn(2 * D, generator=gen))
        angles = torch.arange(64.0)[:, None] * (0.5 ** torch.arange(rotary_dim // 2.0))[None, :]
        self.register_buffer("cos_sin_cache", torch.cat([angles.cos(), angles.sin()], dim=-1))

    @staticmethod
    def norm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    def rotate(self, x, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
        if self.neox:
            x1, x2 = torch.chunk(x, 2, dim=-1)
        else:
            x1, x2 = x[..., ::2], x[..., 1::2]
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return torch.cat((o1, o2), dim=-1) if self.neox else torch.stack((o1, o2), dim=-1).flatten(-2)

    def forward(self, qkv, positions):
        q, k, v = qkv.split([4 * D, 2 * D, 2 * D], dim=-1)
        q, k = self.norm(q, self.q_norm), self.norm(k, self.k_norm)
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        out = []
        for x in (q, k):
            x = x.view(positions.shape[0], -1, D)
            rot = self.rotate(x[..., :self.rotary_dim], cos, sin)
            out.append(torch.cat((rot, x[..., self.rotary_dim:]), dim=-1))
        return out[0], out[1], v


@pytest.mark.parametrize("neox, rotary_dim", [(True, D), (False, D), (True, D // 2)],
                         ids=["neox", "gptj", "neox_partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_rotation_of_q_and_k_from_anywhere_fuses_into_one_kernel(neox, rotary_dim, dtype):
    model = FullWidthNormThenRope(neox, rotary_dim).to(dtype).eval()
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(7, 8 * D, generator=g).to(dtype), torch.randint(0, 64, (7,), generator=g))
    with cpu_kernels(False):
        got, want, fused, misses = _run(model, inputs)
    assert fused == 1, misses
    with torch.no_grad():
        exact = model.double()(inputs[0].double(), inputs[1])
    for g_, w, e in zip(got, want, exact):
        assert g_.shape == w.shape and g_.dtype == w.dtype
        if dtype == torch.float32:
            assert rel_err(g_, w) < 1e-6
        else:
            assert rel_err(g_, e) <= max(4e-3, 1.25 * rel_err(w, e))


@pytest.mark.gpu
@pytest.mark.parametrize("neox, rotary_dim", [(True, D), (False, D), (True, D // 2)],
                         ids=["neox", "gptj", "neox_partial"])
def test_a_rotation_of_q_and_k_from_anywhere_on_cuda(neox, rotary_dim):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = FullWidthNormThenRope(neox, rotary_dim).to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(300, 8 * D, generator=g).to("cuda", torch.bfloat16),
              torch.randint(0, 64, (300,), generator=g).cuda())
    got, want, fused, misses = _run(model, inputs)
    assert fused == 1, misses
    with torch.no_grad():
        exact = model.double()(inputs[0].double(), inputs[1])
    for g_, w, e in zip(got, want, exact):
        assert rel_err(g_, e) <= max(4e-3, 1.25 * rel_err(w, e))
