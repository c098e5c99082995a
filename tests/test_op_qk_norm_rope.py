"""kunlun::qk_norm_rope (separate q/k projections, full-width cos/sin) against float64 and HF's modules."""
import math

import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.ops import cpu_kernels, interpreter_usable, qk_norm_rope

from .conftest import rel_err
from .op_helpers import DTYPES, PATHS, assert_same_rounding, needs_interpreter, seeded

# nq, nkv, head_dim, rotary_dim, is_neox, norm ("plain" | "gemma" | None)
CASES = [
    (4, 2, 32, 32, True, "plain"),  # HF Qwen3
    (3, 1, 24, 24, True, None),  # HF Llama (no q/k norm), head_dim not 2^n
    (2, 2, 16, 8, False, "gemma"),  # partial GPT-J rotary, Gemma-style norm
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def make_inputs(case, dtype, T, gen):
    nq, nkv, D, rot, neox, norm = case
    q = torch.randn(T, nq, D, generator=gen).to(dtype)
    k = torch.randn(T, nkv, D, generator=gen).to(dtype)
    offset = 1.0 if norm == "gemma" else 0.0
    qw = kw = None
    if norm:
        qw = ((offset == 0) + 0.3 * torch.randn(D, generator=gen)).to(dtype)
        kw = ((offset == 0) + 0.3 * torch.randn(D, generator=gen)).to(dtype)
    angles = torch.rand(T, rot // 2, generator=gen) * 2 * math.pi
    full = torch.cat([angles, angles], -1) if neox else angles.repeat_interleave(2, -1)
    return (q, k, qw, kw, full.cos().to(dtype), full.sin().to(dtype), 1e-6, offset, neox)


def float64_prologue(q, k, qw, kw, cos, sin, eps, offset, neox):
    """Per head and per rotary pair, from the definition, in float64."""
    rot = cos.shape[1]
    out = []
    for x, w in ((q, qw), (k, kw)):
        x = x.double()
        if w is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)
        y = x.clone()
        for i in range(rot // 2):
            a, b = (i, i + rot // 2) if neox else (2 * i, 2 * i + 1)
            c, s = cos[:, None, a].double(), sin[:, None, a].double()
            y[..., a] = x[..., a] * c - x[..., b] * s
            y[..., b] = x[..., b] * c + x[..., a] * s
        out.append(y)
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_qk_norm_rope(path, dtype, case):
    args = make_inputs(case, dtype, T=7, gen=seeded("qk", path, dtype, case))
    with cpu_kernels(path == "triton"):
        q, k = torch.ops.kunlun.qk_norm_rope(*args)
    want_q, want_k = float64_prologue(*args)
    assert q.shape == args[0].shape and k.shape == args[1].shape and q.dtype == k.dtype == dtype
    assert rel_err(q, want_q) < TOL[dtype] and rel_err(k, want_k) < TOL[dtype]
    ref = qk_norm_rope.reference(*args)  # and the step-by-step rounding: norm (2 roundings), rotary (3)
    assert_same_rounding(q, ref[0], roundings=5, magnitude=4)
    assert_same_rounding(k, ref[1], roundings=5, magnitude=4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_float_math_is_the_upcast_form(path, dtype, case):
    """`float_math`: half-precision q and k (and weights), float32 tables, computed as a model that rotates
    `x.float()` and casts back: float32 throughout, one rounding.  Compared with float64 and with the eager
    form to the bit (the interpreter's fp32 -> half cast truncates: one rounding apart there)."""
    q, k, qw, kw, cos, sin, eps, offset, neox = make_inputs(case, torch.float32, T=7,
                                                           gen=seeded("qk-float-math", dtype, case))
    q, k = q.to(dtype), k.to(dtype)
    qw, kw = (None, None) if qw is None else (qw.to(dtype), kw.to(dtype))
    args = (q, k, qw, kw, cos, sin, eps, offset, neox)
    with cpu_kernels(path == "triton"):
        got_q, got_k = torch.ops.kunlun.qk_norm_rope(*args, True)
    assert got_q.dtype == got_k.dtype == dtype
    eager_q, eager_k = (x.to(dtype) for x in qk_norm_rope.reference(q.float(), k.float(), *args[2:]))
    for got, eager, want in zip((got_q, got_k), (eager_q, eager_k), float64_prologue(*args)):
        assert rel_err(got, want) < TOL[dtype] / 4  # one rounding, not five
        if path == "reference":
            assert torch.equal(got, eager)
        else:
            assert_same_rounding(got, eager, roundings=1, magnitude=4)
    # and not the module-rounded form, which this case tells apart
    rounded_q, _ = qk_norm_rope.reference(q, k, qw, kw, cos.to(dtype), sin.to(dtype), eps, offset, neox)
    assert not torch.equal(rounded_q, eager_q)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_half_width_tables_give_the_full_width_result(path, dtype, case):
    """One angle per pair, read 2 columns apart (a complex table's real and imaginary parts): the same bits
    as the widened table the model would have built (`cat((c, c))` neox, pairs interleaved)."""
    nq, nkv, D, rot, neox, norm = case
    gen = seeded("qk-half", path, dtype, case)
    q, k, qw, kw, _, _, eps, offset, _ = make_inputs(case, dtype, T=6, gen=gen)
    angles = torch.rand(6, rot // 2, generator=gen) * 2 * math.pi
    parts = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(dtype)  # [T, R/2, 2]
    cos, sin = parts[..., 0], parts[..., 1]
    assert cos.stride(1) == 2
    with cpu_kernels(path == "triton"):
        got = torch.ops.kunlun.qk_norm_rope(q, k, qw, kw, cos, sin, eps, offset, neox, False, True)
        want = torch.ops.kunlun.qk_norm_rope(q, k, qw, kw, qk_norm_rope.widened(cos, neox).contiguous(),
                                             qk_norm_rope.widened(sin, neox).contiguous(), eps, offset, neox)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="rotary_dim / 2"):
        torch.ops.kunlun.qk_norm_rope(q, k, qw, kw, cos[:-1], sin[:-1], eps, offset, neox, False, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", [True, False])
def test_matches_hf_modules(dtype, norm):
    """transformers' Qwen3RMSNorm + rotary embedding + apply_rotary_pos_emb, as HF's attention calls them."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3 import modeling_qwen3 as hf

    nq, nkv, D, T = 4, 2, 32, 9
    cfg = transformers.Qwen3Config(hidden_size=nq * D, num_attention_heads=nq, num_key_value_heads=nkv,
                                   head_dim=D, max_position_embeddings=128)
    gen = seeded("hf", dtype, norm)
    qn, kn = hf.Qwen3RMSNorm(D, 1e-6).to(dtype), hf.Qwen3RMSNorm(D, 1e-6).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(1 + 0.3 * torch.randn(D, generator=gen))
        kn.weight.copy_(1 + 0.3 * torch.randn(D, generator=gen))
    q = torch.randn(1, T, nq, D, generator=gen).to(dtype)
    k = torch.randn(1, T, nkv, D, generator=gen).to(dtype)
    pos = torch.randint(0, 128, (1, T), generator=gen)
    cos, sin = hf.Qwen3RotaryEmbedding(cfg)(q, pos)
    with torch.no_grad():
        qs, ks = (qn(q), kn(k)) if norm else (q, k)
        want_q, want_k = hf.apply_rotary_pos_emb(qs.transpose(1, 2), ks.transpose(1, 2), cos, sin)
    weights = (qn.weight, kn.weight) if norm else (None, None)
    for triton_path in [False, True] if interpreter_usable() else [False]:
        with cpu_kernels(triton_path), torch.no_grad():
            got_q, got_k = torch.ops.kunlun.qk_norm_rope(q[0], k[0], *weights, cos[0], sin[0], 1e-6, 0.0, True)
        assert_same_rounding(got_q, want_q[0].transpose(0, 1), roundings=5 if triton_path else 0.01, magnitude=4)
        assert_same_rounding(got_k, want_k[0].transpose(0, 1), roundings=5 if triton_path else 0.01, magnitude=4)


def test_bad_args():
    gen = seeded("qk-bad-args")
    q, k, w = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 2, 16, generator=gen), torch.randn(16, generator=gen)
    cos = sin = torch.randn(3, 16, generator=gen)
    op = torch.ops.kunlun.qk_norm_rope
    with pytest.raises(ValueError, match="tokens, heads, head_dim"):
        op(q[0], k, w, w, cos, sin, 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="must share"):
        op(q, torch.randn(3, 2, 8, generator=gen), w, w, cos, sin, 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="cos and sin"):
        op(q, k, w, w, cos, torch.randn(3, 8, generator=gen), 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="rotary_dim 18"):
        op(q, k, w, w, torch.randn(3, 18, generator=gen), torch.randn(3, 18, generator=gen), 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="k_weight must be"):
        op(q, k, w, torch.randn(8, generator=gen), cos, sin, 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="both"):
        op(q, k, w, None, cos, sin, 1e-6, 0.0, True)


@pytest.mark.parametrize("path", PATHS)
def test_opcheck(path):
    args = make_inputs(CASES[0], torch.float32, T=5, gen=seeded("qk-opcheck"))
    with cpu_kernels(path == "triton"):
        torch.library.opcheck(torch.ops.kunlun.qk_norm_rope.default, args)


@needs_interpreter
def test_strided_inputs_are_read_in_place():
    """q/k as views of a wider projection (head stride D, row stride larger) and cos/sin with a row stride."""
    gen = seeded("strided")
    big = torch.randn(5, 7 * 16, generator=gen)
    q, k = big[:, :64].view(5, 4, 16), big[:, 64:96].view(5, 2, 16)
    table = torch.randn(5, 40, generator=gen)
    cos, sin = table[:, :16], table[:, 20:36]
    w = torch.randn(16, generator=gen)
    with cpu_kernels(True):
        got = torch.ops.kunlun.qk_norm_rope(q, k, w, w, cos, sin, 1e-6, 0.0, True)
    want = qk_norm_rope.reference(q, k, w, w, cos, sin, 1e-6, 0.0, True)
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_in_float_rounds_once_as_torch_rmsnorm_does(path, dtype):
    """`weight_in_float`: the normalised value times the weight in float32, rounded once -- torch's `F.rms_norm`
    in a half dtype, which the reference's norm reproduces to the bit."""
    q, k, qw, kw, cos, sin, eps, _, neox = make_inputs((4, 2, 32, 32, True, "plain"), dtype, T=7,
                                                       gen=seeded("weight_in_float", path, dtype))
    args = (q, k, qw, kw, cos, sin, eps, 0.0, neox)
    with cpu_kernels(path == "triton"):
        got_q, got_k = torch.ops.kunlun.qk_norm_rope(*args, weight_in_float=True)
    want_q, want_k = float64_prologue(*args)
    assert rel_err(got_q, want_q) < TOL[dtype] and rel_err(got_k, want_k) < TOL[dtype]
    ref_q, ref_k = qk_norm_rope.reference(*args, weight_in_float=True)  # norm (1 rounding), rotary (3)
    assert_same_rounding(got_q, ref_q, roundings=4, magnitude=4)
    assert_same_rounding(got_k, ref_k, roundings=4, magnitude=4)
    no_rotation = (q, k, qw, kw, cos[:, :0], sin[:, :0], eps, 0.0, neox)
    normed_q, _ = qk_norm_rope.reference(*no_rotation, weight_in_float=True)
    assert torch.equal(normed_q, torch.nn.functional.rms_norm(q, (q.shape[-1],), qw, eps))
