"""RMSNorm in any spelling (`norms.py`): recognised as one `kunlun::rmsnorm_primitive` with its rounding in its
arguments, then fused -- alone into kunlun::rms_norm, behind a residual add into kunlun::fused_add_rmsnorm, as a
Q/K norm into the prologue kernels -- or put back as its reference.  Spellings written here independently of
the models the rules were read from; compared with eager and a float64 copy in float32 and bfloat16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kunlun_compile as kc
from kunlun_compile.ops import rmsnorm_primitive
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import rel_err

H = 48
EPS = 1e-5


def _hf(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _divided_by_sqrt(x, w):
    """`x / sqrt(sum(x * x) / n + eps)`: the algebra is normalised to the rsqrt form first."""
    xf = x.float()
    return (xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) / xf.shape[-1] + EPS)).to(x.dtype) * w


def _weight_first(x, w):
    xf = x.to(torch.float32)
    return (w * (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + EPS))).to(x.dtype)


def _gemma(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w.float())).to(x.dtype)


def _torch(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


SPELLINGS = {"hf": _hf, "divided_by_sqrt": _divided_by_sqrt, "weight_first": _weight_first, "gemma": _gemma,
             "torch": _torch}


class Block(nn.Module):
    """A residual add, then a norm of the sum, then a projection: HF's decoder-layer order."""

    def __init__(self, norm, residual: bool, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.norm, self.residual = norm, residual
        self.w = nn.Parameter((1 + 0.1 * torch.randn(H, generator=gen)).to(dtype))
        self.proj = nn.Parameter((torch.randn(H, H, generator=gen) / 7).to(dtype))

    def forward(self, x, r):
        if self.residual:
            x = x + r
            return F.linear(self.norm(x, self.w), self.proj), x
        return F.linear(self.norm(x, self.w), self.proj)


def _run(module, *inputs, **options):
    """bfloat16 runs the ops' references (the interpreter's bf16 rounding is biased; tests/op_helpers.py), which
    round where the spelling rounds: the result is eager's to the bit."""
    torch._dynamo.reset()
    compiled = kc.compile(module, strict=True, **options)
    with torch.no_grad(), cpu_kernels(inputs[0].dtype == torch.float32):
        got, want = compiled(*inputs), module(*inputs)
    graph = compiled.kunlun_backend.report.graphs[0]
    return got, want, graph


def _code(graph) -> str:
    return "\n".join(p.code_after for p in graph.passes if p.code_after)


def _close(got, want, dtype):
    """float32 (the Triton kernels, interpreted): eager's result to rounding; bfloat16: eager's to the bit."""
    if dtype == torch.float32:
        return all(rel_err(g, w) <= 1e-6 for g, w in zip(got, want))
    return all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_fuses_and_matches_eager(spelling, residual, dtype):
    module = Block(SPELLINGS[spelling], residual, dtype)
    gen = torch.Generator().manual_seed(11)
    x, r = (torch.randn(6, H, generator=gen).to(dtype) for _ in range(2))
    got, want, graph = _run(module, x, r)
    assert graph.patterns.get("add_rmsnorm") == 1, (graph.patterns, [m for p in graph.passes for m in p.near_misses])
    code = _code(graph)
    assert ("fused_add_rmsnorm" if residual else "kunlun.rms_norm") in code
    assert "rmsnorm_primitive" not in graph.passes[-1].code_after  # never kept
    got, want = (got, want) if residual else ((got,), (want,))
    assert _close(got, want, dtype), spelling


def test_the_primitive_is_its_reference_to_the_bit():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, H, generator=gen).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(torch.bfloat16)
    for spelling, offset, in_float in (("hf", 0.0, False), ("weight_first", 0.0, True), ("gemma", 1.0, True),
                                       ("torch", 0.0, True)):
        got = torch.ops.kunlun.rmsnorm_primitive(x, w, EPS, offset, in_float)
        assert torch.equal(got, SPELLINGS[spelling](x, w)), spelling
    xf = x.float()
    weightless = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    assert torch.equal(torch.ops.kunlun.rmsnorm_primitive(x, None, EPS, 0.0, False), weightless)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm_primitive.check_args(x, w, 0.0)


class QkNormRope(nn.Module):
    """Per-head q/k views, a Q/K norm of `norm`'s spelling, the head transpose, rotate_half against tables."""

    def __init__(self, norm, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(9)
        self.norm = norm
        self.qw = nn.Parameter((1 + 0.1 * torch.randn(16, generator=gen)).to(dtype))
        self.kw = nn.Parameter((1 + 0.1 * torch.randn(16, generator=gen)).to(dtype))

    @staticmethod
    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, q, k, cos, sin):
        q = self.norm(q, self.qw).transpose(1, 2)
        k = self.norm(k, self.kw).transpose(1, 2)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)


def _qk_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 5, 4, 16, generator=gen), torch.randn(2, 5, 2, 16, generator=gen)
    ang = torch.randn(2, 1, 5, 8, generator=gen)
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    return [t.to(dtype) for t in (q, k, cos, sin)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spelling", ["hf", "gemma", "divided_by_sqrt"])
def test_qk_norms_of_any_spelling_fuse_into_the_prologue(spelling, dtype):
    module = QkNormRope(SPELLINGS[spelling], dtype)
    inputs = _qk_inputs(dtype)
    got, want, graph = _run(module, *inputs)
    assert graph.patterns.get("norm_rope_gate") == 1 and not graph.patterns.get("add_rmsnorm"), graph.patterns
    assert "qk_norm_rope" in _code(graph)
    assert _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_rmsnorm_qk_norms_fuse_into_the_prologue(dtype):
    """torch's RMSNorm multiplies the weight in float32 and rounds once (`weight_in_float`): the prologue kernel
    rounds the same way (its Gemma path at offset 0), so both norms and the rotations are one kernel, and bf16 is
    eager's result to the bit."""
    module = QkNormRope(_torch, dtype)
    inputs = _qk_inputs(dtype)
    got, want, graph = _run(module, *inputs)
    assert graph.patterns.get("norm_rope_gate") == 1 and not graph.patterns.get("add_rmsnorm"), graph.patterns
    (call,) = {line.split("(", 1)[1] for line in _code(graph).splitlines() if "qk_norm_rope.default(" in line}
    # in float32 the weight's multiply is in float32 either way; in bf16 the op is told to round once
    tail = "0.0, True, False, False, True)" if dtype == torch.bfloat16 else "0.0, True)"
    assert call.split(";")[0].endswith(tail), call
    assert _close(got, want, dtype)


def test_with_the_norm_family_off_the_prologue_leaves_no_primitive():
    """The prologue's family recognises norms for its own rules; a norm it did not take goes back as its
    reference when add_rmsnorm (which would fuse it) is disabled."""
    module = Block(_hf, residual=False, dtype=torch.float32)
    x = torch.randn(6, H)
    got, want, graph = _run(module, x, x, disable=("add_rmsnorm",))
    assert "rmsnorm_primitive" not in graph.passes[-1].code_after
    assert not graph.patterns.get("add_rmsnorm")
    assert rel_err(got, want) <= 1e-6


class EscapingMeanSquare(nn.Module):
    """A norm whose mean square is also returned: not fused (it would be computed twice), with a near miss."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(H))

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + EPS) * self.w, variance


def test_a_norm_that_stays_is_explained_once():
    """The prologue's family runs the norm recognition first, quietly: the near miss is the norm family's, once."""
    got, want, graph = _run(EscapingMeanSquare(), torch.randn(6, H))
    misses = [(p.name, m) for p in graph.passes for m in p.near_misses if "rmsnorm_vllm" in m]
    assert [name for name, _ in misses] == ["add_rmsnorm"], misses
    assert not graph.patterns.get("add_rmsnorm")
