"""Rotations written with complex numbers (Meta's Llama reference, torchtitan, HF Llama4 and DeepseekV2):
`view_as_real(view_as_complex(x.float().reshape(.., -1, 2)) * freqs_cis).flatten(-2).type_as(x)`.

Each becomes the rotary primitive (GPT-J pairs in float32, tables the complex table's real and imaginary
parts); q's and k's rotations sharing a table fuse into one `kunlun::qk_norm_rope` wherever q and k come from:
before the head transpose ([B, S, H, D]) or after it and sliced (MLA's q_pe / k_pe, [B, H, S, D]).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kunlun_compile as kc
from kunlun_compile.ops import qk_norm_rope
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import rel_err

B, S, H, KV, D = 2, 7, 4, 2, 16


def complex_rotation(x, freqs_cis):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).type_as(x)


def _freqs(seq=S, half=D // 2):
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * (0.7 ** torch.arange(half, dtype=torch.float32))
    return torch.polar(torch.ones_like(angles), angles)  # [S, D/2] complex64


class MetaAttention(nn.Module):
    """Meta's reference: q and k projected, viewed per head [B, S, H, D], rotated, then transposed."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.wq = nn.Parameter(torch.randn(H * D, 32, generator=gen) / 6)
        self.wk = nn.Parameter(torch.randn(KV * D, 32, generator=gen) / 6)
        self.register_buffer("freqs_cis", _freqs())

    def forward(self, x):
        q = (x @ self.wq.t()).view(B, S, H, D)
        k = (x @ self.wk.t()).view(B, S, KV, D)
        freqs = self.freqs_cis.view(1, S, 1, D // 2)  # reshape_for_broadcast
        q, k = complex_rotation(q, freqs), complex_rotation(k, freqs)
        return q.transpose(1, 2), k.transpose(1, 2)


class MlaRope(nn.Module):
    """DeepSeek-V2's MLA: q viewed per head and transposed, its last 8 dims rotated (q_pe); k_pe one head."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.wq = nn.Parameter(torch.randn(H * (D + 8), 32, generator=gen) / 6)
        self.wk = nn.Parameter(torch.randn(8, 32, generator=gen) / 6)
        self.register_buffer("freqs_cis", _freqs(half=4))

    def forward(self, x):
        q = (x @ self.wq.t()).view(B, S, H, D + 8).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [D, 8], dim=-1)
        k_pe = (x @ self.wk.t()).view(B, 1, S, 8)
        freqs = self.freqs_cis.unsqueeze(0).unsqueeze(1)  # [1, 1, S, 4]
        q_pe, k_pe = complex_rotation(q_pe, freqs), complex_rotation(k_pe, freqs)
        return torch.cat([q_nope, q_pe], dim=-1), k_pe


class LoneComplexRotation(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("freqs_cis", _freqs())

    def forward(self, x):
        return complex_rotation(x.view(B, S, H, D), self.freqs_cis.view(1, S, 1, D // 2))


def _run(model, x):
    torch._dynamo.reset()
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        want, got = model(x), compiled(x)
    graph = compiled.kunlun_backend.report.graphs[0]
    return got, want, graph.patterns.get("norm_rope_gate", 0), [m for p in graph.passes for m in p.near_misses]


def _x(dtype):
    return torch.randn(B, S, 32, generator=torch.Generator().manual_seed(3)).to(dtype)


def _cast_weights(model, dtype):
    """The weights only: `Module.to(dtype)` would also cast the complex table, dropping its imaginary part."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def _outs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("kernel", ["reference", "interpreted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_cls", [MetaAttention, MlaRope], ids=["before_transpose", "mla_after_transpose"])
def test_complex_rotations_of_q_and_k_fuse_into_one_kernel(model_cls, dtype, kernel):
    model = _cast_weights(model_cls(), dtype)
    x = _x(dtype)
    with cpu_kernels(kernel == "interpreted"):
        got, want, fused, misses = _run(model, x)
    assert fused == 1, misses
    for g, w in zip(_outs(got), _outs(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        # float32 arithmetic either way (the complex product or the pairs' products): a few ulps in fp32, a rare
        # last-bit flip once rounded to bf16 -- or, interpreted, the interpreter's truncating cast to bf16
        bound = 1e-6 if dtype == torch.float32 else (8e-3 if kernel == "interpreted" else 4e-3)
        assert rel_err(g, w) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_cls", [MetaAttention, MlaRope], ids=["before_transpose", "mla_after_transpose"])
def test_the_kernel_reads_the_complex_table_in_place_and_rounds_once(model_cls, dtype, monkeypatch):
    """No widened copy of the table (cos and sin are the complex table's parts) and, in bf16, no cast
    kernels around the op: q and k are read in bf16 and the float32 rotation is rounded once, as the model's
    `type_as(x)` does."""
    model = _cast_weights(model_cls(), dtype)
    torch._dynamo.reset()
    compiled = kc.compile(model, strict=True)
    x = _x(dtype)
    calls, reference = [], qk_norm_rope.reference
    monkeypatch.setattr(qk_norm_rope, "reference", lambda *args: calls.append(args) or reference(*args))
    with torch.no_grad(), cpu_kernels(False):
        want, got = model(x), compiled(x)
    q, k, _, _, cos, sin, _, _, neox, float_math, half_width, _ = calls[0]  # (float_math calls itself once more)
    # one angle per pair: the complex table's parts (copied once here: shared over a batch of 2, expanded)
    rotated = 8 if model_cls is MlaRope else D
    assert half_width and not neox and cos.shape[-1] == sin.shape[-1] == rotated // 2
    assert q.dtype == dtype and float_math == (dtype == torch.bfloat16)
    for g, w in zip(_outs(got), _outs(want)):
        assert rel_err(g, w) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_lone_complex_rotation_goes_back_as_real_arithmetic_with_a_near_miss(dtype):
    model = LoneComplexRotation().eval()
    with cpu_kernels(False):
        got, want, fused, misses = _run(model, torch.randn(B, S, H * D).to(dtype))
    assert fused == 0
    assert any("rotary rotation" in m and "left unfused" in m for m in misses), misses
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_a_complex_table_in_double_precision_is_refused():
    class Double(nn.Module):
        def forward(self, q, k, freqs):
            return complex_rotation(q, freqs), complex_rotation(k, freqs)

    freqs = _freqs().to(torch.complex128).view(1, S, 1, D // 2)
    q, k = torch.randn(B, S, H, D, dtype=torch.float64), torch.randn(B, S, KV, D, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = kc.compile(Double(), strict=True)
    with torch.no_grad():
        got, want = compiled(q, k, freqs), Double()(q, k, freqs)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert compiled.kunlun_backend.report.graphs[0].patterns.get("norm_rope_gate", 0) == 0


class Layer(nn.Module):
    def __init__(self, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.wq = nn.Parameter(torch.randn(H * D, 32, generator=gen) / 6)
        self.wk = nn.Parameter(torch.randn(KV * D, 32, generator=gen) / 6)
        self.wo = nn.Parameter(torch.randn(32, H * D, generator=gen) / 6)

    def forward(self, x, freqs_cis):
        q, k = (x @ self.wq.t()).view(B, S, H, D), (x @ self.wk.t()).view(B, S, KV, D)
        freqs = freqs_cis.view(1, S, 1, D // 2)  # the same view in every layer: one node once merged
        q, k = complex_rotation(q, freqs), complex_rotation(k, freqs)
        a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                                                             enable_gqa=True)
        return x + a.transpose(1, 2).reshape(B, S, H * D) @ self.wo.t()


class ThreeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(1), Layer(2), Layer(3)])
        self.register_buffer("freqs_cis", _freqs())

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, self.freqs_cis)
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layers_sharing_one_table_pair_each_layers_own_q_and_k(dtype):
    """Every layer's rotations read one table node: the next layer's k is a structural candidate for this
    layer's q, but it depends on it -- one kernel for both would read its own output.  Each layer pairs its own
    (the pass ran strict: a cycle would have raised)."""
    model = _cast_weights(ThreeLayers(), dtype)
    with cpu_kernels(False):
        got, want, fused, misses = _run(model, _x(dtype))
    assert fused == 3, misses
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("model_cls", [MetaAttention, MlaRope, ThreeLayers],
                         ids=["before_transpose", "mla_after_transpose", "three_layers"])
def test_complex_rotations_on_cuda(model_cls):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _cast_weights(model_cls(), torch.bfloat16).cuda()
    got, want, fused, misses = _run(model, _x(torch.bfloat16).cuda())
    assert fused == (3 if model_cls is ThreeLayers else 1), misses
    for g, w in zip(_outs(got), _outs(want)):
        assert rel_err(g, w) < 4e-3
