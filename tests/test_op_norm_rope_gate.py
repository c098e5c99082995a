"""kunlun::split_norm_rope_gate against float64 math and the modules it replaces."""
import math

import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import cpu_kernels, norm_rope_gate

from .conftest import rel_err
from .op_helpers import DTYPES, PATHS, assert_same_rounding, needs_interpreter, seeded

# nq, nkv, head_dim, rotary_dim, has_gate, is_neox, norm ("plain" | "gemma" | None)
CASES = [
    (4, 2, 32, 8, True, True, "gemma"),  # Qwen3-Next: gated, Gemma norm, partial neox rotary
    (4, 2, 32, 32, False, True, "plain"),  # Qwen3: full neox rotary, plain norm
    (3, 1, 24, 24, False, False, None),  # GPT-J pairs, no norm (Llama/DeepSeek form), head_dim not 2^n
    (2, 2, 16, 6, True, False, "plain"),  # partial GPT-J rotary with a gate
    (2, 1, 16, 0, True, True, "gemma"),  # no rotary at all
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def make_inputs(case, dtype, T, gen):
    nq, nkv, D, rot, gate, neox, norm = case
    qkv = torch.randn(T, norm_rope_gate.qkv_columns(nq, nkv, D, gate), generator=gen).to(dtype)
    offset = 1.0 if norm == "gemma" else 0.0
    qw = kw = None
    if norm:
        qw = ((offset == 0) + 0.3 * torch.randn(D, generator=gen)).to(dtype)
        kw = ((offset == 0) + 0.3 * torch.randn(D, generator=gen)).to(dtype)
    angles = torch.rand(64, max(rot // 2, 1), generator=gen) * 2 * math.pi
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)[:, :rot] if rot else torch.empty(64, 0)
    pos = torch.randint(0, 64, (T,), generator=gen)
    return (qkv, qw, kw, cache, pos, nq, nkv, D, rot, 1e-6, offset, gate, neox)


def float64_prologue(qkv, qw, kw, cache, pos, nq, nkv, D, rot, eps, offset, gate, neox):
    """Per head and per rotary pair, written from the definition in float64."""
    qkv = qkv.double()
    T = qkv.shape[0]
    width = 2 * D if gate else D
    heads = [qkv[:, h * width: h * width + D] for h in range(nq)]
    gates = [qkv[:, h * width + D: h * width + 2 * D] for h in range(nq)] if gate else []
    k0 = nq * width
    heads += [qkv[:, k0 + h * D: k0 + (h + 1) * D] for h in range(nkv)]
    out = []
    for h, x in enumerate(heads):
        x = x.clone()
        if qw is not None:
            w = (qw if h < nq else kw).double() + offset
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        y = x.clone()
        for i in range(rot // 2):
            a, b = (i, i + rot // 2) if neox else (2 * i, 2 * i + 1)
            cos, sin = cache[pos, i].double(), cache[pos, rot // 2 + i].double()
            y[:, a] = x[:, a] * cos - x[:, b] * sin
            y[:, b] = x[:, b] * cos + x[:, a] * sin
        out.append(y)
    q = torch.cat(out[:nq], dim=1)
    k = torch.cat(out[nq:], dim=1)
    g = torch.cat(gates, dim=1) if gate else qkv.new_empty(T, 0)
    return q, k, g


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_split_norm_rope_gate(path, dtype, case):
    args = make_inputs(case, dtype, T=7, gen=seeded(path, dtype, case))
    with cpu_kernels(path == "triton"):
        q, k, gate = torch.ops.kunlun.split_norm_rope_gate(*args)
    want_q, want_k, want_g = float64_prologue(*args)
    nq, nkv, D = case[:3]
    assert q.shape == (7, nq * D) and k.shape == (7, nkv * D) and gate.shape == want_g.shape
    assert q.dtype == k.dtype == gate.dtype == dtype
    assert rel_err(q, want_q) < TOL[dtype] and rel_err(k, want_k) < TOL[dtype]
    if case[4]:
        assert torch.equal(gate.double(), want_g)  # the raw gate is a copy
    # and the step-by-step rounding of the reference: norm (2 roundings), rotary (3)
    ref = norm_rope_gate.reference(*args)
    assert_same_rounding(q, ref[0], roundings=5, magnitude=4)
    assert_same_rounding(k, ref[1], roundings=5, magnitude=4)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gemma", [False, True])
def test_matches_the_modules_it_replaces(dtype, gemma):
    """vLLM-style per-head RMSNorm modules + RotaryEmbedding, as the built-in models call them."""
    from kunlun_compile.models.layers import RotaryEmbedding, make_norm

    nq, nkv, D, rot = 4, 2, 32, 16
    gen = seeded("modules", dtype, gemma)
    qn, kn = make_norm(D, 1e-6, gemma).to(dtype), make_norm(D, 1e-6, gemma).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(0.3 * torch.randn(D, generator=gen) + (not gemma))
        kn.weight.copy_(0.3 * torch.randn(D, generator=gen) + (not gemma))
    rope = RotaryEmbedding(D, rot, 128, 10000.0, True)
    T = 9
    qkv = torch.randn(T, (2 * nq + 2 * nkv) * D, generator=gen).to(dtype)
    pos = torch.randint(0, 128, (T,), generator=gen)
    q_gate, k, _ = qkv.split([2 * nq * D, nkv * D, nkv * D], dim=-1)
    q, gate = q_gate.view(T, nq, 2 * D).chunk(2, dim=-1)
    q = qn(q.reshape(T, nq, D)).view(T, nq * D)
    k = kn(k.reshape(T, nkv, D)).view(T, nkv * D)
    want_q, want_k = rope(pos, q, k)
    for triton_path in [False, True]:
        with cpu_kernels(triton_path):
            got = torch.ops.kunlun.split_norm_rope_gate(qkv, qn.weight, kn.weight, rope.cos_sin_cache, pos, nq, nkv,
                                                        D, rot, 1e-6, 1.0 if gemma else 0.0, True, True)
        assert_same_rounding(got[0], want_q, roundings=5 if triton_path else 0.01, magnitude=4)
        assert_same_rounding(got[1], want_k, roundings=5 if triton_path else 0.01, magnitude=4)
        assert torch.equal(got[2], gate.reshape(T, nq * D))


def test_bad_args():
    gen = seeded("nrg-bad-args")
    qkv = torch.randn(3, (4 + 2) * 16, generator=gen)
    pos = torch.arange(3)
    cache = torch.randn(8, 8, generator=gen)
    w = torch.randn(16, generator=gen)
    op = torch.ops.kunlun.split_norm_rope_gate
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        op(qkv, w, w, torch.randn(8, 7, generator=gen), pos, 4, 1, 16, 7, 1e-6, 0.0, False, True)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        op(qkv, w, w, torch.randn(8, 18, generator=gen), pos, 4, 1, 16, 18, 1e-6, 0.0, False, True)
    with pytest.raises(ValueError, match="columns"):
        op(qkv, w, w, cache, pos, 4, 1, 16, 8, 1e-6, 0.0, True, True)
    with pytest.raises(ValueError, match="q_weight must be"):
        op(qkv, torch.randn(8, generator=gen), w, cache, pos, 4, 1, 16, 8, 1e-6, 0.0, False, True)
    with pytest.raises(ValueError, match="positions"):
        op(qkv, w, w, cache, torch.arange(4), 4, 1, 16, 8, 1e-6, 0.0, False, True)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        op(qkv, w, w, torch.randn(8, 4, generator=gen), pos, 4, 1, 16, 8, 1e-6, 0.0, False, True)
    with pytest.raises(ValueError, match="both"):
        op(qkv, w, None, cache, pos, 4, 1, 16, 8, 1e-6, 0.0, False, True)


@pytest.mark.parametrize("path", PATHS)
def test_opcheck(path):
    args = make_inputs(CASES[0], torch.float32, T=5, gen=seeded("opcheck"))
    with cpu_kernels(path == "triton"):
        torch.library.opcheck(torch.ops.kunlun.split_norm_rope_gate.default, args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_in_float_rounds_once_as_torch_rmsnorm_does(path, dtype):
    """`weight_in_float` (torch's RMSNorm as the Q/K norm): the kernel's one-rounding norm path at offset 0."""
    args = make_inputs((4, 2, 32, 8, True, True, "plain"), dtype, T=7, gen=seeded("weight_in_float", path, dtype))
    with cpu_kernels(path == "triton"):
        q, k, gate = torch.ops.kunlun.split_norm_rope_gate(*args, weight_in_float=True)
    want_q, want_k, _ = float64_prologue(*args)
    assert rel_err(q, want_q) < TOL[dtype] and rel_err(k, want_k) < TOL[dtype]
    ref = norm_rope_gate.reference(*args, weight_in_float=True)  # norm (1 rounding), rotary (3)
    assert_same_rounding(q, ref[0], roundings=4, magnitude=4)
    assert_same_rounding(k, ref[1], roundings=4, magnitude=4)
    if dtype != torch.float32:  # the one rounding is not the two of the default path
        assert not torch.equal(ref[0], norm_rope_gate.reference(*args)[0])
