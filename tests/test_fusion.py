"""Fusion passes on real model code: exact matches per family, kernel counts, outputs, near misses."""
import dataclasses

import pytest
import torch
from torch import nn

import kunlun_compile as kc
from kunlun_compile.models import build_model
from kunlun_compile.ops import cpu_kernels

from .conftest import float64_reference, rel_err

FAMILIES = ("norm_rope_gate", "add_rmsnorm", "moe_gate", "moe_ffn", "masked_input", "attention_mask",
            "decode_linear")
# decode_linear: 16 static tokens, so only the linears with <= 64 outputs (o/down of hidden 64, routers,
# Qwen3-Next's shared-expert gate) take the GEMV; the rest refuse (cuBLAS is the kernel at 16 rows)
DENSE = dict(norm_rope_gate=2, add_rmsnorm=5, moe_gate=0, moe_ffn=0, masked_input=1, attention_mask=1,
             decode_linear=4)
MOE = dict(DENSE, moe_gate=2, moe_ffn=2)
# built-in model (2 layers) -> (matches per family, ATen kernels before, kernels after: fused, generated
# element-wise, aten).  The ATen kernels left are matmuls and attention only.
# with a dynamic token count every linear is rewritten (the op picks GEMV or cuBLAS per call)
DYNAMIC_LINEARS = {"llama-tiny": 9, "qwen3-tiny": 9, "qwen3-next-tiny": 13, "qwen3-moe-tiny": 7, "deepseek-v3-tiny": 11}
BUILTIN_EXPECTED = {
    "llama-tiny": (DENSE, 102, 13, 1, 7),  # SwiGLU inside the down projection (kunlun::gated_linear)
    "qwen3-tiny": (DENSE, 126, 13, 1, 7),
    "qwen3-next-tiny": (dict(MOE, decode_linear=8), 185, 19, 1, 7),  # + attention gate, shared-expert residual
    "qwen3-moe-tiny": (MOE, 148, 17, 1, 5),
    # the routed scaling factor in the moe_gate kernel (was two `mul` kernels: the grouped router's rule kept it out)
    "deepseek-v3-tiny": (dict(MOE, decode_linear=6), 160, 19, 1, 7),
}


def _compile(model, *inputs, **options):
    compiled = kc.compile(model, strict=True, **options)
    with torch.no_grad():
        got = compiled(*inputs)
    return got, compiled.kunlun_backend.report


@pytest.mark.parametrize("name", list(BUILTIN_EXPECTED))
def test_builtin_models_fuse_exactly(name):
    patterns, before, fused, pointwise, aten_after = BUILTIN_EXPECTED[name]
    model, inputs = build_model(name, dtype=torch.float32, seed=1)
    got, report = _compile(model, *inputs)
    (g,) = report.graphs
    assert g.patterns == patterns
    assert sum(g.kernels_before.values()) == before
    assert g.kernels == {"fused": fused, "pointwise": pointwise, "aten": aten_after}
    assert g.vector_ops > 0 and len(g.generated) == pointwise
    assert report.summary()["fallbacks"] == []
    with torch.no_grad():
        want = model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3-next-tiny", "deepseek-v3-tiny"])
def test_builtin_bf16_fuses_the_same_and_stays_close_to_float64(name):
    model, inputs = build_model(name, dtype=torch.bfloat16, seed=3)
    with cpu_kernels(False):  # op references: the interpreter's bf16 rounding is biased (tests/op_helpers.py)
        got, report = _compile(model, *inputs)
        with torch.no_grad():
            want = model(*inputs)
    assert report.graphs[0].patterns == BUILTIN_EXPECTED[name][0]
    ref = float64_reference(model, inputs)
    assert rel_err(got, ref) <= max(2e-2, 1.25 * rel_err(want, ref))


def test_variants_gptj_partial_rotary_and_sliding_window():
    model, inputs = build_model("llama-tiny", rope_is_neox=False, rotary_dim=8, sliding_window=5, seed=4)
    got, report = _compile(model, *inputs)
    assert report.graphs[0].patterns == DENSE
    with torch.no_grad():
        torch.testing.assert_close(got, model(*inputs), rtol=1e-5, atol=1e-5)


def test_disabled_family_is_left_alone():
    model, inputs = build_model("qwen3-moe-tiny", seed=1)
    _, report = _compile(model, *inputs, disable=("moe_ffn",))
    assert report.graphs[0].patterns == dict(MOE, moe_ffn=0)


# ---- HF transformers tiny models ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _hf(kind: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, \
        Qwen3MoeForCausalLM
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval().requires_grad_(False)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval().requires_grad_(False)
    cfg = Qwen3MoeConfig(**common, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         decoder_sparse_step=1, mlp_only_layers=[], **extra)
    return Qwen3MoeForCausalLM(cfg).eval().requires_grad_(False)


# The HF attention prologue (separate projections, rotate_half) -> qk_norm_rope (Qwen3 absorbs its q/k norms);
# HF's residual adds fuse with the next norm (sum rounded to the dtype); sdpa builds no mask.
# 12 static tokens: the 10 linears with <= 64 outputs take the GEMV; each layer's q/k/v GEMVs read one input
# (HF views the hidden states once per projection; canonicalisation merges the equal views) and are grouped
# into one launch: 10 GEMVs in 6 kernels.
HF_COMMON = dict.fromkeys(FAMILIES, 0) | {"norm_rope_gate": 2, "add_rmsnorm": 5, "decode_linear": 10}
# kind -> (matches per family, ATen kernels before, kernels after: fused, generated element-wise, aten).
# ATen left: matmuls and sdpa; the rotary table (arange, cat) and the KV cache's cats are generated kernels.
HF_EXPECTED = {
    "llama": (HF_COMMON, 108, 13, 8, 7),
    "qwen3": (HF_COMMON, 132, 13, 8, 7),
    "qwen3_moe": (HF_COMMON | {"moe_gate": 2, "moe_ffn": 2}, 140, 17, 8, 3),
    # transformers' default experts: sorted pairs, histc offsets, two grouped GEMMs
    "qwen3_moe_grouped_mm": (HF_COMMON | {"moe_gate": 2, "moe_ffn": 2}, 156, 17, 8, 3),
}


def _hf_model(kind):
    if kind == "qwen3_moe":
        return _hf(kind, experts_implementation="batched_mm")
    return _hf("qwen3_moe") if kind == "qwen3_moe_grouped_mm" else _hf(kind)


@pytest.mark.parametrize("kind", list(HF_EXPECTED))
def test_hf_models_fuse_exactly(kind):
    patterns, before, fused, pointwise, aten_after = HF_EXPECTED[kind]
    model = _hf_model(kind)
    ids = torch.randint(0, 256, (1, 12))
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    report = compiled.kunlun_backend.report
    assert [g.patterns for g in report.graphs] == [patterns]
    g = report.graphs[0]
    assert sum(g.kernels_before.values()) == before
    assert g.kernels == {"fused": fused, "pointwise": pointwise, "aten": aten_after}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3", "llama", "qwen3_moe_grouped_mm"])
def test_hf_bf16_batch2_stays_close_to_float64(kind):
    """Two sequences share one cos/sin table (position ids [1, S]): the replacement expands it per token."""
    model = _hf_model(kind).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 10))
    with cpu_kernels(False):  # op references: the interpreter's bf16 rounding is biased (tests/op_helpers.py)
        compiled = kc.compile(model, strict=True)
        with torch.no_grad():
            got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    # 20 static rows: every linear stays with cuBLAS
    assert compiled.kunlun_backend.report.graphs[0].patterns == dict(HF_EXPECTED[kind][0], decode_linear=0)
    # grouped GEMMs take no float64: the reference runs the same experts through batched_mm
    m64 = (_hf_model("qwen3_moe") if kind == "qwen3_moe_grouped_mm" else _hf_model(kind)).to(torch.float64)
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = m64(input_ids=ids).logits
    assert rel_err(got, ref) <= max(2e-2, 1.25 * rel_err(want, ref))


# ---- near misses: left alone, with the reason recorded ---------------------------------------------------

class NormWithTensorEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32))
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class NormSharingItsVariance(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32))

    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + 1e-6)) * self.weight, variance  # the variance escapes


def _near_misses(report):
    return [line for g in report.graphs for p in g.passes for line in p.near_misses]


@pytest.mark.parametrize("module, reason", [
    (NormWithTensorEps(), "eps is a tensor, not a Python constant"),
    (NormSharingItsVariance(), "is used outside the pattern"),
])
def test_near_miss_norms_are_left_alone_with_a_reason(module, reason):
    x = torch.randn(6, 32)
    got, report = _compile(module.eval().requires_grad_(False), x)
    assert report.graphs[0].patterns["add_rmsnorm"] == 0 and report.graphs[0].kernels["fused"] == 0
    misses = _near_misses(report)
    assert any(line.startswith("add_rmsnorm/") and reason in line for line in misses), misses
    with torch.no_grad():
        want = module(x)
    torch.testing.assert_close(got, want)


def test_unsupported_head_dim_is_left_alone_with_a_reason():
    model, inputs = build_model("qwen3-tiny", head_dim=12, seed=1)
    got, report = _compile(model, *inputs)
    assert report.graphs[0].patterns["norm_rope_gate"] == 0
    assert any("head_dim 12 is not supported" in line for line in _near_misses(report))
    with torch.no_grad():
        torch.testing.assert_close(got, model(*inputs), rtol=1e-5, atol=1e-5)


# ---- noise the matcher must see through ----------------------------------------------------------------

class NoisyResidualNorm(nn.Module):
    """vLLM's residual RMSNorm, with views, a clone and transposes that cancel around it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32))

    def forward(self, x, residual):
        x = x.reshape(-1, 4, 8).reshape(-1, 32).clone()
        residual = residual.t().t()
        h = x.to(torch.float32) + residual.to(torch.float32)
        new_residual = h.to(x.dtype)
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-5)
        return h.to(x.dtype) * self.weight, new_residual


def test_matching_sees_through_views_clones_and_cancelling_transposes():
    m = NoisyResidualNorm().eval().requires_grad_(False)
    x, r = torch.randn(5, 32), torch.randn(5, 32)
    got, report = _compile(m, x, r)
    assert report.graphs[0].patterns["add_rmsnorm"] == 1
    with torch.no_grad():
        want = m(x, r)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- HF grouped-GEMM experts: the device-dependent spelling ------------------------------------------------

@pytest.mark.parametrize("cast, fused", [(torch.float32, 1), (torch.int32, 1), (torch.bfloat16, 0)])
def test_hf_grouped_mm_experts_match_whatever_histc_counts_in(cast, fused):
    """transformers casts the sorted expert ids to float32 for histc on the CPU and to int32 on CUDA;
    both count exactly and fuse.  A cast that can round an id (bfloat16) is refused with the reason."""
    from kunlun_compile.passes.pattern_engine import apply_rewrites, trace_aten
    from kunlun_compile.passes.rules import moe_experts

    gen = torch.Generator().manual_seed(3)
    experts, k = 6, 2
    args = (torch.randn(5, 16, generator=gen), torch.randn(experts, 24, 16, generator=gen),
            torch.randn(experts, 16, 12, generator=gen), torch.randint(0, experts, (5, k), generator=gen),
            torch.rand(5, k, generator=gen))
    gm = trace_aten(moe_experts.hf_grouped_mm_experts, args)
    (to_float,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten._to_copy.default]
    to_float.kwargs = {**to_float.kwargs, "dtype": cast}  # as a CUDA (or a hostile) graph spells it
    outcome = apply_rewrites(gm, moe_experts.RECOGNISE)  # the fuse stage takes every primitive this makes
    assert sum(n.target is torch.ops.kunlun.experts.default for n in gm.graph.nodes) == fused
    if not fused:
        assert any("cast to torch.bfloat16" in line for line in outcome.near_misses), outcome.near_misses


def test_hf_grouped_mm_experts_with_sentinel_masks_fuse_when_ids_are_a_top_k():
    """transformers 5.17 (the GPU machines' version) always zeroes expert-parallel sentinel rows (ids >= E)
    around each grouped GEMM; 5.24 does it behind `_is_expert_parallel`.  Ids from the router's top-k over E
    scores hold no sentinel: the masks select nothing and the experts fuse, exactly."""
    model = _hf_model("qwen3_moe_grouped_mm")
    for m in model.modules():
        if hasattr(m, "_is_expert_parallel"):
            m._is_expert_parallel = True
    ids = torch.randint(0, 256, (1, 12))
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    assert compiled.kunlun_backend.report.graphs[0].patterns == HF_EXPECTED["qwen3_moe_grouped_mm"][0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_grouped_mm_experts_with_sentinel_masks_refused_when_ids_may_hold_sentinels():
    """Ids handed in from outside (an expert-parallel dispatch) may be >= E: the masks then matter and the
    fused op knows nothing of them, so the rule refuses and says why."""
    from kunlun_compile.passes.pattern_engine import apply_rewrites, trace_aten
    from kunlun_compile.passes.rules import moe_experts

    gen = torch.Generator().manual_seed(4)
    experts = 6
    args = (torch.randn(5, 16, generator=gen), torch.randn(experts, 24, 16, generator=gen),
            torch.randn(experts, 16, 12, generator=gen), torch.randint(0, experts + 1, (5, 2), generator=gen),
            torch.rand(5, 2, generator=gen))
    gm = trace_aten(moe_experts.hf_grouped_mm_sentinel_experts, args)
    outcome = apply_rewrites(gm, moe_experts.RECOGNISE)
    assert not any(n.target is torch.ops.kunlun.experts.default for n in gm.graph.nodes)
    assert any("may hold sentinels" in line and "not from a top-k" in line for line in outcome.near_misses), \
        outcome.near_misses


# ---- forms found by the HF corpus probe (benchmarks/hf_corpus_probe.py) ------------------------------------

_LOCAL_EXPERTS = ("Mixtral", "GraniteMoe", "GptOss")  # MoE architectures configured with num_local_experts
_MOE_OPTIONS = {  # the other MoE architectures' own names for their sizes
    "Dots1": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                  first_k_dense_replace=0, n_group=1, topk_group=1),
    "Ernie4_5_Moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=64),
}


def _hf_arch(arch: str, dtype, **extra):
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=128, pad_token_id=0)
    moe = dict(num_local_experts=4, num_experts_per_tok=2) if arch in _LOCAL_EXPERTS else _MOE_OPTIONS.get(arch, {})
    cfg = getattr(transformers, f"{arch}Config")(**{**common, **moe, **extra})
    torch.manual_seed(0)
    model_class = "Gemma3ForCausalLM" if arch == "Gemma3Text" else f"{arch}ForCausalLM"
    return getattr(transformers, model_class)(cfg).to(dtype).eval().requires_grad_(False)


CORPUS_FORMS = [
    # the router leaves its weights in float32; transformers' default grouped-GEMM experts
    ("Mixtral", {"moe_gate": 2, "moe_ffn": 2, "add_rmsnorm": 5}),
    # `(weight * x).to(dtype)`: the weight multiplies in float32 (q/k norms, post-norms: 9 lone norms);
    # float32 cos/sin: the rotation promotes to float32 and is cast back once
    ("Olmo2", {"add_rmsnorm": 9, "norm_rope_gate": 2}),
    # rotary on a slice, the rest passed through by `cat`: partial (StableLm, a quarter of each head) and
    # full width with an empty passed slice (Phi3, q/k sliced out of one fused projection)
    ("StableLm", {"norm_rope_gate": 2}),
    ("Phi3", {"norm_rope_gate": 2, "add_rmsnorm": 5}),
    # Q/K norms (`1 + w`) after the head transpose, then rotary
    ("Gemma3Text", {"norm_rope_gate": 2, "add_rmsnorm": 9}),
    # pair (GPT-J) rotation: Cohere rotates in float32 and rounds back once (the op runs in float32 there),
    # Glm over half of each head with tables it interleaves itself
    ("Cohere", {"norm_rope_gate": 2}),
    ("Glm", {"norm_rope_gate": 2, "add_rmsnorm": 5}),
    # Helium interleaves its tables inside apply_rotary_pos_emb at full width; Ernie4.5 also rotates in float32
    ("Helium", {"norm_rope_gate": 2, "add_rmsnorm": 5}),
    ("Ernie4_5", {"norm_rope_gate": 2, "add_rmsnorm": 5}),
    # Llama-style Q/K norms after the head transpose (in the prologue, not lone norms)
    ("Exaone4", {"norm_rope_gate": 2, "add_rmsnorm": 5}),
    # top-k of the logits, then a softmax over the k
    ("GraniteMoe", {"moe_gate": 2, "moe_ffn": 2}),
    # float32 routers in a bf16 model: DeepSeek-V3's with one group and no renormalisation; softmax + bias with
    # a clamped renormalisation (one MoE layer: moe_layer_start_index 1)
    ("Dots1", {"moe_gate": 2, "moe_ffn": 2}),
    ("Ernie4_5_Moe", {"moe_gate": 1, "moe_ffn": 1}),
    # the halves rotation without rotate_half, half-width tables; top-k-then-softmax in the dtype
    ("GptOss", {"norm_rope_gate": 2, "moe_gate": 2}),
]


def check_corpus_form(arch: str, expected: dict, device: str = "cpu"):
    """`arch` in bf16 on `device`: the families in `expected` found that often, the logits as close to
    float64 as eager's (or 2e-2)."""
    model = _hf_arch(arch, torch.bfloat16).to(device)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    patterns = compiled.kunlun_backend.report.graphs[0].patterns
    assert {k: patterns[k] for k in expected} == expected, patterns
    # grouped GEMMs take no float64: the reference runs the same experts through batched_mm
    moe = arch in _LOCAL_EXPERTS or arch in _MOE_OPTIONS
    m64 = _hf_arch(arch, torch.float64, **({"experts_implementation": "batched_mm"} if moe else {}))
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = m64.to(device)(input_ids=ids).logits
    assert rel_err(got, ref) <= max(2e-2, 1.25 * rel_err(want, ref))


@pytest.mark.parametrize("arch, expected", CORPUS_FORMS)
def test_hf_bf16_forms_fuse_and_stay_close_to_float64(arch, expected):
    with cpu_kernels(False):  # op references: the interpreter's bf16 rounding is biased (tests/op_helpers.py)
        check_corpus_form(arch, expected)


@pytest.mark.parametrize("arch", ["Cohere", "Glm", "Helium", "Ernie4_5", "Exaone4", "GptOss"])
def test_hf_rotary_forms_fuse_exactly_in_fp32(arch):
    model = _hf_arch(arch, torch.float32)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, model(input_ids=ids).logits
    assert compiled.kunlun_backend.report.graphs[0].patterns["norm_rope_gate"] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_alias_registered_after_the_first_compile_is_still_matched():
    """transformers registers its grouped-GEMM op on import, which may come after a compile traced the
    rules: the resolved aliases are part of a compiled pattern's cache key."""
    from kunlun_compile.passes import pattern_engine as pe
    from kunlun_compile.passes.rules import moe_experts

    plain = next(r for r in moe_experts.RECOGNISE if r.name == "hf_grouped_mm")
    rule = dataclasses.replace(plain, aliases={torch.ops.kunlun.grouped_mm.default:
                                                               ("kunlun_late::grouped_mm",)})
    before = pe._patterns_for(rule, {torch.float32})
    assert pe.resolved_aliases(rule) == ()
    lib = torch.library.Library("kunlun_late", "FRAGMENT")  # a throwaway op, this test only
    lib.define("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor")
    late = torch.ops.kunlun_late.grouped_mm.default
    after = pe._patterns_for(rule, {torch.float32})
    fns = [f for c in after for q in pe._pattern_nodes(c.strict) for f in q.fns]
    assert late in fns and all(late not in q.fns for c in before for q in pe._pattern_nodes(c.strict))


# ---- why didn't it fuse: anchors left in the graph say how close a pattern came ---------------------------

def test_an_expert_gemm_left_unfused_says_where_the_closest_pattern_differed():
    from kunlun_compile.passes import pattern_engine as pe
    from kunlun_compile.passes.fusion import fusion_passes
    from kunlun_compile.passes.rules import moe_experts

    gen = torch.Generator().manual_seed(3)
    args = (torch.randn(5, 16, generator=gen), torch.randn(6, 24, 16, generator=gen),
            torch.randn(6, 16, 12, generator=gen), torch.randint(0, 6, (5, 2), generator=gen),
            torch.rand(5, 2, generator=gen))
    gm = pe.trace_aten(moe_experts.hf_grouped_mm_experts, args)
    for n in gm.graph.nodes:  # experts with a GELU: no rule has that form
        if n.target is torch.ops.aten.silu.default:
            n.target = torch.ops.aten.gelu.default
    gm.recompile()
    (moe_ffn,) = [p for p in fusion_passes() if p.name == "moe_ffn"]
    outcome = moe_ffn.fn(gm, None)
    assert not outcome.patterns.get("moe_ffn")
    lines = [line for line in outcome.near_misses if "left unfused" in line]
    assert len(lines) == 2, outcome.near_misses  # both grouped GEMMs
    assert all("the pattern has aten::silu, the graph aten::gelu" in line for line in lines), lines


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3_moe_grouped_mm"])
def test_a_model_that_fuses_whole_reports_no_unfused_anchor(kind):
    compiled = kc.compile(_hf_model(kind), strict=True)
    with torch.no_grad():
        compiled(input_ids=torch.randint(0, 256, (1, 12)))
    assert not [line for line in _near_misses(compiled.kunlun_backend.report) if "left unfused" in line]


class NormBySumOverNMinusOne(nn.Module):
    """An RMS over `sum / (n - 1)`: not a mean (`sum / n` is one: passes/algebra.py), no rule has it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / 31 + 1e-6) * self.weight


def test_an_rsqrt_left_unfused_is_explained_and_a_refused_one_is_not_explained_twice():
    x = torch.randn(6, 32)
    _, report = _compile(NormBySumOverNMinusOne().eval().requires_grad_(False), x)
    lines = [line for line in _near_misses(report) if line.startswith("add_rmsnorm: ")]
    assert len(lines) == 1 and "left unfused; closest pattern" in lines[0] and ", where " in lines[0], lines
    _, report = _compile(NormWithTensorEps().eval().requires_grad_(False), x)
    misses = _near_misses(report)
    assert any("eps is a tensor" in line for line in misses)  # the guard's reason, and nothing more on it
    assert not [line for line in misses if "left unfused" in line], misses


class RopeTablesFirst(nn.Module):
    """HF's rotary with the products written table-first (`cos * q`): no pattern has that order."""

    def forward(self, q, k, cos, sin):
        from kunlun_compile.ops.rotary import rotate
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos * q + sin * rotate(q, neox=True), cos * k + sin * rotate(k, neox=True)


def test_a_rotation_left_unfused_is_described():
    args = (torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    _, report = _compile(RopeTablesFirst(), *args)
    lines = [line for line in _near_misses(report) if line.startswith("norm_rope_gate: ")]
    assert len(lines) == 2, lines  # q and k
    assert "neox halves (cat), of float32 [2, 4, 5, 16] with cos float32 [2, 1, 5, 16]) left unfused" in lines[0]


@pytest.mark.parametrize("head_dim", [16, 12])
def test_a_fused_or_refused_rotation_is_not_described(head_dim):
    """Fused rotations leave the graph; one the guard refused (head_dim 12: not a multiple of 8 for the
    kernel) has its reason already."""
    compiled = kc.compile(_hf_arch("Llama", torch.float32, head_dim=head_dim), strict=True)
    with torch.no_grad():
        compiled(input_ids=torch.randint(0, 256, (1, 7)))
    misses = _near_misses(compiled.kunlun_backend.report)
    assert not [line for line in misses if line.startswith("norm_rope_gate: ") and "left unfused" in line], misses
    assert any("head_dim 12 is not supported" in line for line in misses) == (head_dim == 12), misses


class RouterSoftmaxDim1(nn.Module):
    """HunYuan's router: softmax over dim=1 of 2-D logits (canonicalised to dim=-1), top-k, renormalised."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        probs = torch.softmax(self.gate(x).float(), dim=1)
        weights, ids = torch.topk(probs, 2, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids


def test_a_router_spelling_dim_1_fuses():
    model, x = RouterSoftmaxDim1().eval().requires_grad_(False), torch.randn(6, 32)
    (got_w, got_i), report = _compile(model, x)
    want_w, want_i = model(x)
    assert report.graphs[0].patterns["moe_gate"] == 1
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_group, topk_group", [(4, 2), (1, 1)])
def test_hf_deepseek_v3_router_fuses_exactly(n_group, topk_group):
    """transformers' DeepseekV3TopkRouter (float32 whatever the model's dtype, int64 ids, `+ 1e-20`), the
    grouped form and Glm4-MoE's one group."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, n_routed_experts=16, n_group=n_group, topk_group=topk_group,
                           num_experts_per_tok=4)
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(cfg).eval().requires_grad_(False)
    nn.init.normal_(router.weight)
    nn.init.normal_(router.e_score_correction_bias, std=0.1)
    x = torch.randn(7, 32).to(torch.bfloat16)
    got, report = _compile(router, x)
    want = router(x)
    assert report.graphs[0].patterns["moe_gate"] == 1
    # the model's top-k is unsorted: each token's (id, weight) pairs are the result, in any order
    (got_ids, got_order), (want_ids, want_order) = got[2].sort(dim=-1), want[2].sort(dim=-1)
    assert torch.equal(got_ids, want_ids) and got[2].dtype == torch.int64
    torch.testing.assert_close(got[1].gather(1, got_order), want[1].gather(1, want_order), rtol=1e-6, atol=1e-6)


def _hf_router(kind: str, dtype: torch.dtype):
    """A transformers router module with random weights (and bias), its input in `dtype`."""
    torch.manual_seed(0)
    if kind == "dots1":  # DeepSeek-V3's router with one group, norm_topk_prob False
        from transformers.models.dots1.modeling_dots1 import Dots1Config, Dots1TopkRouter
        router = Dots1TopkRouter(Dots1Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4,
                                             n_group=1, topk_group=1, routed_scaling_factor=2.5))
        nn.init.normal_(router.e_score_correction_bias, std=0.1)
    elif kind == "ernie":  # softmax, top-k on probs + bias, / clamp(sum, norm_min)
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import (Ernie4_5_MoeConfig,
                                                                              Ernie4_5_MoeTopKRouter)
        router = Ernie4_5_MoeTopKRouter(Ernie4_5_MoeConfig(hidden_size=32, moe_num_experts=16, moe_k=4))
        nn.init.normal_(router.moe_statics.e_score_correction_bias, std=0.05)
    elif kind == "deepseek_v2":  # greedy: softmax, unsorted top-k, scaled
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2TopkRouter
        router = DeepseekV2TopkRouter(DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4,
                                                       routed_scaling_factor=1.5))
    else:  # gpt_oss: linear with bias, top-k of the logits, softmax over the k in the logits' dtype
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssTopKRouter
        router = GptOssTopKRouter(GptOssConfig(hidden_size=32, num_local_experts=16, num_experts_per_tok=4))
        nn.init.normal_(router.bias)
    nn.init.normal_(router.weight)
    return router.to(dtype).eval().requires_grad_(False), torch.randn(7, 32).to(dtype)


HF_ROUTERS = ["dots1", "ernie", "deepseek_v2", "gpt_oss"]


@pytest.mark.parametrize("kind", HF_ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_routers_fuse_with_the_models_numbers(kind, dtype):
    check_hf_router(kind, dtype, "cpu")


def check_hf_router(kind: str, dtype: torch.dtype, device: str):
    """Corpus routers, each its own spelling: the ids are the model's (as sets where its top-k is unsorted),
    the weights the model's (its renormalisation -- `+ 1e-20`, a clamp -- is kept as written)."""
    router, x = _hf_router(kind, dtype)
    if kind == "dots1" or kind == "ernie":  # float32 routers: their parameters stay float32 in the model
        router.float()
    router, x = router.to(device), x.to(device)
    # the linear left to ATen: a bf16 GEMV kernel's logits may differ from eager's by an ulp, which moves a
    # softmax over bf16 logits by percents -- the router is compared on eager's own logits
    got, report = _compile(router, x, disable=("decode_linear",))
    want = router(x)
    assert report.graphs[0].patterns["moe_gate"] == 1 and torch.equal(got[0], want[0])
    (got_ids, got_order), (want_ids, want_order) = got[2].sort(dim=-1), want[2].sort(dim=-1)
    assert torch.equal(got_ids, want_ids) and got[2].dtype == torch.int64
    got_w, want_w = got[1].gather(1, got_order), want[1].gather(1, want_order)
    assert got_w.dtype == want_w.dtype and not got_w.isnan().any()
    tol = 1e-6 if want_w.dtype == torch.float32 else 8e-3  # bf16: the op's fp32 result rounded once
    torch.testing.assert_close(got_w, want_w, rtol=tol, atol=tol)


def test_clamped_renormalisation_with_a_tensor_bound_stays_after_the_fused_router():
    """The router fuses; a renormalisation with a clamp (constant or tensor bound) is not the kernel's and stays
    after it as the model wrote it, so the result is the model's."""
    def router(logits, bias, bound):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        ids = torch.topk(probs + bias, 4, dim=-1)[1]
        w = probs.gather(-1, ids)
        return w / torch.clamp(w.sum(-1, keepdim=True), min=bound), ids

    logits, bias, bound = torch.randn(7, 16), torch.randn(16) * 0.05, torch.tensor(1e-12)
    got, report = _compile(router, logits, bias, bound)
    assert report.graphs[0].patterns.get("moe_gate", 0) == 1
    code = next(p for p in report.graphs[0].passes if p.name == "moe_gate").code_after
    assert "aten.clamp.Tensor" in code and "kunlun.moe_gate" in code
    want = router(logits, bias, bound)
    # the ids exactly; the weights within fp32 rounding (the sum runs as a generated row kernel)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weightless_rmsnorm_fuses_exactly(dtype):
    check_weightless_rmsnorm(dtype, "cpu")


def check_weightless_rmsnorm(dtype: torch.dtype, device: str):
    """Llama4's L2 Q/K norm (an RMSNorm without weight, float32 inside, `type_as` back): one rounding, as
    the op with a weight of ones (the weight's product is exact)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm

    norm = Llama4TextL2Norm(1e-5)
    x = (torch.randn(2, 5, 4, 32) * 3).to(device, dtype)
    got, report = _compile(norm, x)
    assert report.graphs[0].patterns["add_rmsnorm"] == 1
    want = norm(x)
    assert got.dtype == want.dtype and not got.isnan().any()
    tol = 2e-6 if dtype == torch.float32 else 8e-3  # fp32: summation order; bf16: at most one rounding apart
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
