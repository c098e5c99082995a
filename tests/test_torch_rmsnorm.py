"""torch's own RMSNorm -- `nn.RMSNorm`, `F.rms_norm` -- fuses like the hand-written ones.

Its decomposition spells the norm `(x.float() * rsqrt(mean(x^2) + eps) * weight).to(dtype)`: the weight
multiplies in fp32 and the product is rounded once (the op's `weight_in_float`), `eps` is rounded to float32
and added in place (`add_.Scalar`).  Found by compiling an independently written decode stack
(tests/decode_stack.py) in bf16: none of its 9 norms fused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kunlun_compile as kc
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import rel_err

H = 48
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class TorchNorm(nn.Module):
    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.norm = nn.RMSNorm(H, eps=1e-5, elementwise_affine=spelling != "weightless")
        if self.norm.weight is not None:
            with torch.no_grad():
                self.norm.weight.copy_(1.0 + 0.3 * torch.randn(H))

    def forward(self, x, residual):
        if self.spelling == "module":
            return self.norm(x)
        if self.spelling == "functional":  # eps left to its default: torch picks finfo(dtype).eps
            return F.rms_norm(x, (H,), self.norm.weight)
        if self.spelling == "weightless":
            return self.norm(x)
        h = x + residual
        if self.spelling == "residual":
            return self.norm(h), h
        return self.norm(h)  # residual_unused: the model's last norm


EXPECTED = {"module": 1, "functional": 1, "weightless": 1, "residual": 1, "residual_unused": 1}


def _inputs(dtype, tokens=7):
    g = torch.Generator().manual_seed(3)
    return torch.randn(tokens, H, generator=g).to(dtype), torch.randn(tokens, H, generator=g).to(dtype)


def _compile(model, inputs):
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        want, got = model(*inputs), compiled(*inputs)
    graph = compiled.kunlun_backend.report.graphs[0]
    misses = [m for p in graph.passes for m in p.near_misses]
    return got, want, graph.patterns.get("add_rmsnorm", 0), misses


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("kernel", ["reference", "interpreted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("spelling", list(EXPECTED))
def test_torch_rmsnorm_fuses_with_the_models_rounding(spelling, dtype, kernel):
    """The op's reference gives eager's bits; the Triton kernel under the interpreter forms the mean as its
    own sum and `1 / sqrt`, so it is judged against float64 as eager is -- except in bf16, where the
    interpreter's float32 -> bf16 cast truncates (numpy has no bf16), about twice eager's rounding error."""
    torch._dynamo.reset()
    model = TorchNorm(spelling).to(dtype).eval()
    inputs = _inputs(dtype)
    with cpu_kernels(kernel == "interpreted"):
        got, want, fused, misses = _compile(model, inputs)
    assert fused == EXPECTED[spelling], misses
    with torch.no_grad():
        exact = model.double()(*(t.double() for t in inputs))
    for g, w, e in zip(_flat(got), _flat(want), _flat(exact)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if kernel == "reference" or dtype == torch.float32:
            assert rel_err(g, w) <= (1e-6 if dtype == torch.float32 else 0.0)
        elif dtype == torch.bfloat16:
            assert rel_err(g, w) < 8e-3
        else:
            assert rel_err(g, e) <= max(1e-3, 1.25 * rel_err(w, e))


def test_a_float32_weight_on_half_activations_multiplies_in_float32():
    """`nn.RMSNorm` kept in fp32 while activations run in bf16: the product is formed in fp32 either way, so
    the weight's dtype is no reason to refuse."""
    torch._dynamo.reset()

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(H))

        def forward(self, x):
            return F.rms_norm(x, (H,), self.weight.to(torch.float32), 1e-6).to(x.dtype)

    model = Mixed().eval()
    x = _inputs(torch.bfloat16)[0]
    got, want, fused, misses = _compile(model, (x,))
    assert fused == 1, misses
    assert torch.equal(got, want)


def test_the_ops_weight_in_float_rounds_once():
    """The flag's meaning (the op's reference), against float64: one rounding of the fp32 product, where the
    default rounds the normalised x first -- the two differ on some elements in bf16."""
    x, r = _inputs(torch.bfloat16, tokens=64)
    w = (1.0 + 0.3 * torch.randn(H)).to(torch.bfloat16)
    with cpu_kernels(False):
        once = torch.ops.kunlun.rms_norm(x, w, 1e-6, 0.0, True)
        twice = torch.ops.kunlun.rms_norm(x, w, 1e-6, 0.0)
        out, new_r = torch.ops.kunlun.fused_add_rmsnorm(x, r, w, 1e-6, 0.0, True, True)
    xf = x.double()
    exact = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert torch.equal(once, exact.to(torch.bfloat16)) or rel_err(once, exact) < rel_err(twice, exact)
    assert not torch.equal(once, twice)
    assert torch.equal(new_r, x + r)
    s = (x + r).double()
    assert rel_err(out, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("spelling", list(EXPECTED))
def test_torch_rmsnorm_on_cuda(spelling, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    model = TorchNorm(spelling).to("cuda", dtype).eval()
    inputs = tuple(t.cuda() for t in _inputs(dtype, tokens=300))
    got, want, fused, misses = _compile(model, inputs)
    assert fused == EXPECTED[spelling], misses
    with torch.no_grad():
        exact = model.double()(*(t.double() for t in inputs))
    for g, w, e in zip(_flat(got), _flat(want), _flat(exact)):
        assert rel_err(g, e) <= max(1e-3, 1.25 * rel_err(w, e))


class HandWritten(nn.Module):
    """RMSNorm as other code bases write it by hand."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(H, generator=torch.Generator().manual_seed(4)))

    def forward(self, x):
        xf = x.float()
        if self.spelling == "div_sqrt":
            return (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight
        if self.spelling == "self_product_type_as":  # gpt-fast
            return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + 1e-6)).type_as(x) * self.weight
        if self.spelling == "sum_over_width":
            return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / H + 1e-6)).to(x.dtype) * self.weight
        if self.spelling == "square_weight_first":
            return (self.weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6))).type_as(x)
        return F.rms_norm(xf, (H,), self.weight.float(), 1e-6).to(x.dtype)  # torch's norm on an upcast x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spelling", ["div_sqrt", "self_product_type_as", "sum_over_width", "square_weight_first",
                                      "torch_on_upcast"])
def test_hand_written_norms_fuse(spelling, dtype):
    torch._dynamo.reset()
    model = HandWritten(spelling).to(dtype).eval()
    with cpu_kernels(False):
        got, want, fused, misses = _compile(model, (_inputs(dtype)[0],))
    assert fused == 1, misses
    # `x / sqrt` becomes `x * rsqrt`: an ulp apart in fp32, the same bf16 after the cast
    assert torch.equal(got, want) if dtype == torch.bfloat16 else rel_err(got, want) < 1e-6
