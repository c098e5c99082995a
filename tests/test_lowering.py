"""The element-wise lowering: policy, KIR, code generation, clusters, cache, and the backend around it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kunlun_compile as kc
from kunlun_compile.config import CompileConfig
from kunlun_compile.graph_stats import count_kernels, generated_kernels
from kunlun_compile.lowering.cache import kir_for
from kunlun_compile.lowering.codegen import coalesce, generate
from kunlun_compile.lowering.kir import KernelIR
from kunlun_compile.passes import PassContext
from kunlun_compile.ops import cpu_kernels
from kunlun_compile.passes.lower_elementwise import lower_elementwise

from .test_cli import cli

F = torch.nn.functional


def lower(fn, *inputs, **options):
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    outcome = lower_elementwise(gm, PassContext(CompileConfig.from_options(options), "t"))
    gm.graph.lint()
    gm.recompile()
    return gm, outcome


def kirs(gm):
    return [kir_for(k) for k in generated_kernels(gm)]


def forms(kir: KernelIR):
    return {(i.op, i.form, i.unit) for i in kir.instrs if i.form}


# ---- accuracy policy and targets ----------------------------------------------------------------

def test_fp32_is_precise_bf16_takes_relative_sfu_forms_fast_math_takes_all():
    x32, x16 = torch.randn(4, 8), torch.randn(4, 8).bfloat16()
    (k32,) = kirs(lower(torch.sigmoid, x32)[0])
    assert forms(k32) == {("exp", "precise", "vec")} and k32.count("sfu") == 0
    (k16,) = kirs(lower(torch.sigmoid, x16)[0])
    assert forms(k16) == {("exp2", "approx", "sfu"), ("rcp", "approx", "sfu")}
    (kfast,) = kirs(lower(torch.sigmoid, x32, fast_math=True)[0])
    assert forms(kfast) == {("exp2", "approx", "sfu"), ("rcp", "approx", "sfu")}
    # absolute-error forms stay precise for bf16 results (sin.approx: 51 ULP in bf16, NOTES v6)
    (ksin,) = kirs(lower(torch.sin, x16)[0])
    assert forms(ksin) == {("sin", "precise", "vec")}
    (ksin_fast,) = kirs(lower(torch.sin, x16, fast_math=True)[0])
    assert forms(ksin_fast) == {("sin", "approx", "sfu")}
    # tanh inside gelu's 1 + tanh cancels: precise even for bf16
    (kgelu,) = kirs(lower(lambda t: F.gelu(t, approximate="tanh"), x16)[0])
    assert ("tanh", "precise", "vec") in forms(kgelu)
    # fp64 never approximates
    (k64,) = kirs(lower(torch.sigmoid, x32.double(), fast_math=True)[0])
    assert k64.count("sfu") == 0


def test_target_decides_the_unit():
    x = torch.randn(4, 8)
    (cuda,) = kirs(lower(torch.erf, x)[0])
    (xpu,) = kirs(lower(torch.erf, x, target="kunlun-xpu")[0])
    assert forms(cuda) == {("erf", "precise", "vec")}  # no erf on the CUDA SFU: a libdevice sequence
    assert forms(xpu) == {("erf", "precise", "sfu")}  # Kunlun's SFU: high-precision erf
    with pytest.raises(ValueError, match="kunlun-xpu"):
        CompileConfig.from_options({"target": "tpu"})


# ---- KIR and code generation ----------------------------------------------------------------------

def test_listing_tags_every_instruction_and_json_round_trips():
    x, y = torch.randn(4, 8).bfloat16(), torch.randn(8).bfloat16()
    (kir,) = kirs(lower(lambda a, b: F.silu(a) * b + float("inf"), x, y)[0])
    lines = [ln for ln in kir.listing().splitlines() if ln.strip().startswith(("%", "store"))]
    assert lines and all(ln.split()[-1] in ("vec", "sfu", "mem", "imm") for ln in lines)
    assert "exp2.approx" in kir.listing() and "inf" in kir.listing()
    again = KernelIR.from_json(json.loads(json.dumps(kir.to_json())))
    assert again == kir and again.key == kir.key


def test_cuda_source_has_ptx_sfu_instructions_portable_source_has_none():
    (kir,) = kirs(lower(torch.sigmoid, torch.randn(4, 8).half())[0])
    src = generate(kir)
    cuda, portable = src.split("def kernel_portable")
    assert 'inline_asm_elementwise("ex2.approx.f32' in cuda and "rcp.approx.f32" in cuda
    assert "inline_asm" not in portable and "libdevice" not in portable
    (precise,) = kirs(lower(torch.sigmoid, torch.randn(4, 8))[0])
    assert "libdevice.exp(" in generate(precise).split("def kernel_portable")[0]


def test_coalesce_merges_dims_contiguous_for_every_input():
    assert coalesce((4, 8, 16), [(128, 16, 1), (128, 16, 1)]) == ([512], [[1], [1]])
    # a row-broadcast input keeps two dims
    assert coalesce((4, 8, 16), [(128, 16, 1), (0, 0, 1)]) == ([32, 16], [[16, 1], [0, 1]])
    assert coalesce((1, 5, 1), [(5, 1, 1)]) == ([5], [[1]])
    assert coalesce((1, 1), [(1, 1)]) == ([1], [[0]])


# ---- clusters ----------------------------------------------------------------------------------

def test_clusters_never_create_a_cycle():
    """a = sigmoid(x) feeds a matmul and, directly, the add after it: one kernel for both would need its
    own output as input; the lowering makes two."""
    def f(x, w):
        a = torch.sigmoid(x)
        return a + a @ w

    x, w = torch.randn(8, 8), torch.randn(8, 8)
    gm, outcome = lower(f, x, w)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 1}
    torch.testing.assert_close(gm(x, w), f(x, w))


def test_a_reduction_joins_its_producers_and_consumers_in_one_row_kernel():
    def f(x, b):
        y = torch.exp(x * 0.5) + b  # producers, b broadcast
        s = y.sum(-1, keepdim=True)  # the reduction
        return y / s - 1.0  # consumers: y along the row, s per row

    x, b = torch.randn(6, 32), torch.randn(32)
    gm, _ = lower(f, x, b)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}
    (key,) = generated_kernels(gm)
    assert kir_for(key).reduce_dim == 1 and "reduce.sum" in kir_for(key).listing()
    torch.testing.assert_close(gm(x, b), f(x, b))


def test_clusters_end_at_reductions_of_another_dim():
    def f(x):
        y = torch.exp(x * 0.5)
        return y / y.sum(0, keepdim=True) + y / y.sum(-1, keepdim=True)

    x = torch.randn(6, 32)
    gm, _ = lower(f, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 2, "aten": 0}
    torch.testing.assert_close(gm(x), f(x))


def test_strided_inputs_are_read_through_their_strides():
    def f(qkv):
        q, k = qkv[:, :16], qkv.t()[:16, :].t()  # a slice and a doubly transposed slice
        return q * torch.sigmoid(k)

    x = torch.randn(7, 48)
    gm, _ = lower(f, x)
    assert count_kernels(gm)["pointwise"] == 1
    torch.testing.assert_close(gm(x), f(x))


def test_refused_nodes_stay_aten_with_a_reason():
    def f(x, e):
        return torch.pow(x.abs() + 1, e) + 1  # integer pow

    x, e = torch.randint(-3, 3, (5, 6)), torch.randint(0, 4, (5, 6))
    gm, outcome = lower(f, x, e)
    assert "integer pow" in "\n".join(outcome.near_misses)
    torch.testing.assert_close(gm(x, e), f(x, e))


def test_results_in_an_inputs_layout_are_written_in_that_layout():
    """Eager's `x.t().sigmoid()` keeps x's layout (a transposed result); the kernel writes the same strides."""
    def f(x):
        return x.t().sigmoid() * 2.0

    x = torch.randn(5, 6)
    gm, outcome = lower(f, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}, outcome.near_misses
    assert kirs(gm)[0].output_orders == ((1, 0),)
    want = f(x)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(x)
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=0)


# ---- through the backend -------------------------------------------------------------------------

class GatedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return F.silu(a) * b + x


def test_one_kernel_serves_every_batch_size():
    m = GatedMLP().eval()
    compiled = kc.compile(m, dynamic=True, strict=True)
    with torch.no_grad():
        for n in (1, 5, 9):
            x = torch.randn(n, 32)
            torch.testing.assert_close(compiled(x), m(x))
    (g,) = compiled.kunlun_backend.report.graphs
    # silu, mul, add in one; the matmul is a kunlun::linear (GEMV or cuBLAS, chosen per call)
    assert g.kernels["pointwise"] == 1 and g.kernels["fused"] == 1 and g.kernels["aten"] == 0
    assert any(re.search(r"\bs\d+", i) for i in g.inputs)  # the token count stayed symbolic


def test_report_counts_instructions_and_listings():
    m = GatedMLP().eval().bfloat16()
    be = kc.backend(strict=True)
    with torch.no_grad():
        torch.compile(m, backend=be)(torch.randn(4, 32).bfloat16())
    g = be.report.graphs[0].as_dict()
    (k,) = g["generated_kernels"]
    assert g["sfu_ops"] == k["sfu_ops"] == 2 and g["vector_ops"] == k["vector_ops"] > 5
    assert k["origin"] == "silu, mul, add" and "exp2.approx" in k["listing"]
    assert be.report.summary()["sfu_ops"] == 2


def test_disk_cache_serves_a_second_process(tmp_path):
    script = (
        "import torch, kunlun_compile as kc\n"
        "from kunlun_compile.lowering import cache\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU()).eval()\n"
        "x = torch.randn(3, 8)\n"
        "with torch.no_grad():\n"
        "    got = torch.compile(m, backend=kc.backend(strict=True))(x)\n"
        "torch.testing.assert_close(got, m(x))\n"
        "print(dict(cache.stats))\n")
    env = dict(os.environ, KUNLUN_COMPILE_CACHE_DIR=str(tmp_path), TRITON_INTERPRET="1")
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (eval(r.stdout.strip().splitlines()[-1]) for r in runs)  # noqa: S307 - our own dict
    assert first.get("generated") == 1 and not first.get("read_from_disk")
    assert second.get("read_from_disk") == 1 and not second.get("generated")
    assert len(list(tmp_path.glob("pointwise/pw_*.py"))) == 1


def test_explain_json_and_text_show_generated_kernels():
    # without decode_linear, whose gated linears take these into their GEMVs: per layer the attention
    # gate, the shared SwiGLU, the shared gate (its [T, 1] sigmoid inlined) + residual add
    r = cli("explain", "qwen3-next-tiny", "--dtype", "bf16", "--json", "--disable", "decode_linear")
    out = json.loads(r.stdout)
    assert out["kernels"]["pointwise"] == 7 and out["sfu_ops"] > 0 and out["vector_ops"] > out["sfu_ops"]
    gks = out["graph_reports"][0]["generated_kernels"]
    assert len(gks) == 7 and all(k["listing"].startswith("kernel pw_") for k in gks)
    r = cli("explain", "llama-tiny", "--lowering-target", "kunlun-xpu", "--fast-math", "--source")
    assert "cycles/element/core on kunlun-xpu" in r.stdout and "def kernel_cuda(" in r.stdout


def test_broadcast_gate_with_math_is_recomputed_but_not_heavier_producers():
    """A [T, 1] sigmoid gate and an [H] exp (one math function each) go into their consumer's kernel;
    a producer with three math functions stays a kernel of its own."""
    def gated(g, y, r):
        return torch.sigmoid(g) * y + r * torch.exp(r[0])

    def heavy(g, y):
        return torch.exp(torch.sin(torch.cos(g))) * y

    g, y, r = torch.randn(8, 1), torch.randn(8, 32), torch.randn(8, 32)
    gm, _ = lower(gated, g, y, r)
    assert count_kernels(gm)["pointwise"] == 1
    torch.testing.assert_close(gm(g, y, r), gated(g, y, r), rtol=1e-6, atol=1e-6)
    gm, _ = lower(heavy, g, y)
    assert count_kernels(gm)["pointwise"] == 2
    torch.testing.assert_close(gm(g, y), heavy(g, y), rtol=1e-6, atol=1e-6)


def test_broadcast_producer_is_recomputed_and_siblings_share_a_kernel():
    """HF's rotary table: the int->float cast of pos[:, None] ([T, 1]) is inlined into the multiply
    ([T, D/2]); cos and sin of the concatenated table are one kernel with two outputs."""
    def rotary_table(pos, inv_freq):
        freqs = pos[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)

    pos, inv = torch.arange(16) + 7, 1.0 / 1e6 ** (torch.arange(0, 64, 2).float() / 64)
    gm, _ = lower(rotary_table, pos, inv)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}  # the cat reads freqs twice, in place
    assert [k.origin for k in kirs(gm)] == ["_to_copy, mul, cat, cos, _to_copy, sin, _to_copy"]
    for got, want in zip(gm(pos, inv), rotary_table(pos, inv)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fill_and_full_constants_join_their_consumer():
    def f(x):
        return torch.maximum(x, torch.full((6, 8), 0.25)) + torch.fill(torch.zeros_like(x), 2.0)

    x = torch.randn(6, 8)
    gm, _ = lower(f, x)
    assert count_kernels(gm) == {"fused": 0, "pointwise": 1, "aten": 0}
    torch.testing.assert_close(gm(x), f(x))


def test_a_generated_kernel_that_fails_at_run_time_falls_back_with_one_warning(monkeypatch):
    """A bug in generated code must not break the model: the graph falls back to its uncompiled form."""
    from kunlun_compile.lowering import cache

    def broken(key):
        raise RuntimeError("planted code generation failure")

    monkeypatch.setattr(cache, "kernel_for", broken)
    m = GatedMLP().eval()
    x = torch.randn(3, 32)
    be = kc.backend()  # not strict: the fallback is what is tested
    with torch.no_grad(), pytest.warns(UserWarning, match="planted code generation failure") as rec:
        got = torch.compile(m, backend=be)(x)
        again = torch.compile(m, backend=be)(x)
    torch.testing.assert_close(got, m(x))
    torch.testing.assert_close(again, m(x))
    assert sum("planted" in str(w.message) for w in rec) == 1


def test_bf16_compare_with_a_scalar_rounds_the_scalar_first():
    """torch compares `bf16 > 0.3` against bf16(0.3) = 0.30078125; comparing in fp32 would flip this element."""
    x = torch.tensor([0.30078125, 0.296875, 1.0]).bfloat16()
    gm, _ = lower(lambda t: torch.where(t > 0.3, t, -t), x)
    with cpu_kernels(False):
        assert torch.equal(gm(x), torch.where(x > 0.3, x, -x))
    with cpu_kernels(True):
        assert torch.equal(gm(x), torch.where(x > 0.3, x, -x))


def test_interpreted_bf16_cast_rounds_to_nearest_even():
    """Triton's interpreter truncates fp32 -> bf16; generated kernels round as torch does."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    gm, _ = lower(lambda t: t.to(torch.bfloat16), x)
    with cpu_kernels(True):
        assert torch.equal(gm(x), x.to(torch.bfloat16))


def test_an_output_used_before_its_cluster_ends_is_reordered():
    """Found by hypothesis: eq feeds a cluster of another shape and its own; the getitem standing for it
    must be ordered before its users before dead code is removed."""
    def f(a, b):
        m = torch.eq(b, b)
        return a.masked_fill(m, -1.25), b.masked_fill(m, -1.25)

    a, b = torch.randn(2), torch.randn(())
    gm, outcome = lower(f, a, b)
    assert outcome.matches == 2
    for got, want in zip(gm(a, b), f(a, b)):
        torch.testing.assert_close(got, want)


def _rotary_inv_freq(x, y):  # HF rotary tables: a scalar base to a tensor power
    return x * (1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16)))


@pytest.mark.parametrize("fn", [
    _rotary_inv_freq,
    lambda x, y: torch.pow(x.abs() + 0.5, y) * 2.0,  # tensor ** tensor
    lambda x, y: torch.clamp(x, min=-y.abs(), max=y.abs() * 0.5),  # Phimoe's sparsemixer: tensor bounds
    lambda x, y: torch.clamp(x.bfloat16(), min=y.bfloat16()) * 1.5,
    lambda x, y: torch.clamp(x, max=y),
], ids=["scalar_base_pow", "tensor_pow", "clamp_tensors", "clamp_min_bf16", "clamp_max"])
def test_tensor_exponents_and_tensor_clamp_bounds_are_generated(fn):
    """pow with a tensor exponent is powf (libdevice's, as torch's tensor-tensor kernel); clamp with tensor
    bounds is torch's own definition: x unless it is below min (above max), NaN in x or in a bound kept."""
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    x[0, 0], y[1, 1], y[2, 2] = float("nan"), float("nan"), -0.0
    gm, outcome = lower(fn, x, y)
    assert count_kernels(gm)["aten"] == 0, outcome.near_misses
    want = fn(x, y)
    for interpreted in (False, True):
        with cpu_kernels(interpreted):
            got = gm(x, y)
        assert torch.equal(got.isnan(), want.isnan())
        # the KIR interpreter is torch itself; Triton's interpreter takes numpy's pow (one unit)
        torch.testing.assert_close(got, want, rtol=2.5e-7 if interpreted else 0, atol=0, equal_nan=True)
