"""Compiled outputs of every built-in model and of HF tiny models equal eager."""
import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.ops import cpu_kernels
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, builtin_names, make_inputs

from .conftest import float64_reference, rel_err


def _compile_and_run(model, inputs):
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got = compiled(*inputs)
        want = model(*inputs)
    return got, want, compiled.kunlun_backend.report


def test_two_compiles_of_one_module_keep_their_own_backends():
    """`compiled.kunlun_backend` lives on the compiled handle: set on the module (where `OptimizedModule`
    forwards attributes) a second compile with other options took it over, and the first handle read the
    second's report (bench_fusion's fused-op column was the fusion-off report's, empty)."""
    model, inputs = build_model("llama-tiny", num_tokens=6, seed=0)
    fused = kc.compile(model, strict=True)
    generic = kc.compile(model, strict=True, fusion=False)
    assert fused.kunlun_backend is not generic.kunlun_backend and not hasattr(model, "kunlun_backend")
    with torch.no_grad():
        fused(*inputs)
    assert fused.kunlun_backend.report.graphs[0].patterns["add_rmsnorm"] == 5
    assert generic.kunlun_backend.report.graphs == []


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_fp32_matches_eager(name):
    model, inputs = build_model(name, dtype=torch.float32, seed=1)
    got, want, report = _compile_and_run(model, inputs)
    assert len(report.graphs) == 1, "a built-in model must compile as one graph"
    assert report.summary()["fallbacks"] == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # fresh inputs through the same compiled graph
    ids, pos = make_inputs(BUILTIN_CONFIGS[name], 16, generator=torch.Generator().manual_seed(7))
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_bf16_against_float64(name):
    model, inputs = build_model(name, dtype=torch.bfloat16, seed=2)
    # the fused ops run their torch references here: the Triton interpreter rounds fp32->bf16 with a bias
    # (see tests/op_helpers.py); the kernels' bf16 results are checked per op, and on the GPU per model
    with cpu_kernels(False):
        got, want, _ = _compile_and_run(model, inputs)
    ref = float64_reference(model, inputs)
    eager_err, compiled_err = rel_err(want, ref), rel_err(got, ref)
    # bf16 rounding alone gives ~1e-2; MoE routing may flip under bf16 in eager too, so the bound is
    # relative to eager's own error against float64.
    assert compiled_err <= max(2e-2, 1.25 * eager_err), (compiled_err, eager_err)
    assert rel_err(got, want) <= 2e-2 or compiled_err <= 1.25 * eager_err


def test_builtin_models_are_seeded_and_configurable():
    a, ia = build_model("llama-tiny", seed=3)
    b, ib = build_model("llama-tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(ia[0], ib[0])
    c, _ = build_model("llama-tiny", num_hidden_layers=3, hidden_size=32)
    assert len(c.layers) == 3 and c.config.hidden_size == 32
    with pytest.raises(ValueError, match="built-in models are"):
        build_model("gpt-17")


def test_vocab_shard_mask_path():
    """With a simulated second shard, off-shard tokens embed to zero, as in vLLM."""
    model, (ids, pos) = build_model("llama-tiny", tp_rank=1, tp_size=2)
    emb = model.embed_tokens
    out = emb(ids)
    off = (ids < emb.start) | (ids >= emb.end)
    assert off.any() and (~off).any()
    assert torch.all(out[off] == 0)
    torch.testing.assert_close(out[~off], emb.weight[ids[~off] - emb.start])
    got, want, _ = _compile_and_run(model, (ids, pos))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- HF transformers tiny models (built from configs: no downloads) -----------------------------

transformers = pytest.importorskip("transformers")

HF_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)


def _hf_model(kind: str, dtype):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(**HF_COMMON)
        cls = LlamaForCausalLM
    elif kind == "qwen3":
        cfg = Qwen3Config(**HF_COMMON, head_dim=16)
        cls = Qwen3ForCausalLM
    else:
        cfg = Qwen3MoeConfig(**HF_COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
        cls = Qwen3MoeForCausalLM
    cfg._attn_implementation = "sdpa"
    return cls(cfg).to(dtype).eval().requires_grad_(False)


def _hf_compiled_and_eager(model):
    ids = torch.randint(0, 256, (2, 12))
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        want = model(input_ids=ids).logits
    assert compiled.kunlun_backend.report.summary()["fallbacks"] == []
    return got, want, ids


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe"])
def test_hf_fp32_matches_eager(kind):
    got, want, _ = _hf_compiled_and_eager(_hf_model(kind, torch.float32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_hf_bf16_against_float64(kind):
    model = _hf_model(kind, torch.bfloat16)
    got, want, ids = _hf_compiled_and_eager(model)
    with torch.no_grad():
        ref = model.to(torch.float64)(input_ids=ids).logits
    assert rel_err(got, ref) <= max(2e-2, 1.25 * rel_err(want, ref))
