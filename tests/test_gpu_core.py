"""The backend core on a CUDA device (skipped without one): bf16 built-in models and HF models."""
import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, builtin_names, make_inputs

from .conftest import float64_reference, rel_err
from .test_fusion import (BUILTIN_EXPECTED, CORPUS_FORMS, DYNAMIC_LINEARS, HF_ROUTERS, check_corpus_form,
                          check_hf_router, check_weightless_rmsnorm)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_bf16_on_cuda(name):
    model, inputs = build_model(name, dtype=torch.bfloat16, device="cuda", num_tokens=64, seed=5)
    compiled = kc.compile(model, dynamic=True, strict=True)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for t in [64, 1, 7, 33]:
            ids, pos = make_inputs(BUILTIN_CONFIGS[name], t, device="cuda", generator=gen)
            got, want = compiled(ids, pos), model(ids, pos)
            ref = float64_reference(model, (ids, pos))
            assert rel_err(got, ref) <= max(2e-2, 1.25 * rel_err(want, ref))
    assert len(compiled.kunlun_backend.report.graphs) == 1
    assert compiled.kunlun_backend.report.summary()["fallbacks"] == []
    # every family fused on the GPU graph too (the fused ops ran their Triton kernels above)
    want_patterns = dict(BUILTIN_EXPECTED[name][0], decode_linear=DYNAMIC_LINEARS[name])
    assert compiled.kunlun_backend.report.graphs[0].patterns == want_patterns


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe_grouped_mm"])
def test_hf_bf16_on_cuda(kind):
    """HF models: attention prologue and residual norms fused, Triton kernels in the loop."""
    pytest.importorskip("transformers")
    from .test_fusion import HF_EXPECTED, _hf_model

    model = _hf_model(kind).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        want = model(input_ids=ids).logits
    # grouped GEMMs take no float64: the reference runs the same experts through batched_mm
    m64 = _hf_model("qwen3_moe" if kind == "qwen3_moe_grouped_mm" else kind).to("cuda", torch.float64)
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = m64(input_ids=ids).logits
    # 24 static rows: every linear stays with cuBLAS.  transformers 5.17 (the GPU machines') builds the causal
    # mask in the graph for these ids where 5.24 leaves it to sdpa's is_causal: one fused mask or none (seen on
    # the H200: 1), what it computes checked by the logits below
    patterns = dict(compiled.kunlun_backend.report.graphs[0].patterns)
    masks = patterns.pop("attention_mask")
    want_patterns = {k: v for k, v in HF_EXPECTED[kind][0].items() if k != "attention_mask"}
    assert masks <= 1 and patterns == dict(want_patterns, decode_linear=0)
    assert rel_err(got, ref) <= max(2e-2, 1.25 * rel_err(want, ref))


@pytest.mark.parametrize("arch, expected", CORPUS_FORMS)
def test_hf_corpus_forms_on_cuda(arch, expected):
    """The forms found by the HF corpus, with the GPU machines' transformers (its spellings differ: 5.17
    masks expert-parallel sentinels around the grouped GEMMs) and the Triton kernels."""
    pytest.importorskip("transformers")
    check_corpus_form(arch, expected, "cuda")


@pytest.mark.parametrize("kind", HF_ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_routers_on_cuda(kind, dtype):
    """The corpus routers (Dots1, Ernie-4.5-MoE, DeepSeek-V2 greedy, GptOss) with the Triton moe_gate kernel."""
    pytest.importorskip("transformers")
    check_hf_router(kind, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weightless_rmsnorm_on_cuda(dtype):
    pytest.importorskip("transformers")
    check_weightless_rmsnorm(dtype, "cuda")
