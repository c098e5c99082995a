"""HF `generate()` through the backend, as a user writes it: `model.forward = torch.compile(model.forward,
backend="kunlun")`, default settings of the newest transformers, dynamic and static KV caches.

Its decode graph has a KV length that grows every step (a size other than the token count): the runtime
runs the nodes that depend on it (the cache `cat`, the attention) uncaptured and captures the rest.  The
CPU runs the runtime with plain calls (graph_mode forced); `-m gpu` with CUDA graphs, the default mode."""
import warnings

import pytest
import torch

import kunlun_compile as kc

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 8


def _model(kind: str, dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=128, initializer_range=0.2)
    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=128, **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                                   decoder_sparse_step=1, intermediate_size=128, **common))
    return model.to(dtype).eval()


def generate_both(kind: str, cache: str, device: str, dtype, graph_mode: str, new_tokens: int = NEW_TOKENS):
    """(eager tokens, compiled tokens of two generate calls, the backend)."""
    model = _model(kind, dtype).to(device)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1)).to(device)
    # disable_compile: with a static cache on CUDA, generate() would compile the forward with inductor
    # itself, around ours (and the reference would be inductor, not eager)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, disable_compile=True,
                  cache_implementation="static" if cache == "static" else None)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
    torch._dynamo.reset()
    be = kc.backend(graph_mode=graph_mode)
    model.forward = torch.compile(model.forward, backend=be)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [model.generate(ids, **kwargs) for _ in range(2)]
    ours = [w for w in caught if "kunlun" in str(w.message)]
    return want, got, be, ours


def decode_counters(be) -> dict:
    total = {}
    for g in be.report.graphs:
        if g.runtime_info:
            for k, v in g.runtime_info()["counters"].items():
                total[k] = total.get(k, 0) + v
    return total


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_replays_decode_steps_and_matches_eager(kind, cache):
    want, got, be, warned = generate_both(kind, cache, "cpu", torch.float32, "piecewise")
    for tokens in got:
        assert torch.equal(tokens, want)
    assert not warned, [str(w.message) for w in warned]
    assert not [f for g in be.report.graphs for f in g.fallbacks]
    counters = decode_counters(be)
    # the second generate's decode steps replay captures (8 steps x 2 layers' worth of pieces)
    assert counters["replays"] >= NEW_TOKENS and counters["capture_failures"] == 0
    dynamic_splits = [p for g in be.report.graphs if g.runtime_info for p in g.runtime_info()["pieces"]
                      if "which is not the token count" in p]
    if cache == "dynamic":
        assert dynamic_splits  # the KV length: the cache cat runs uncaptured, and the report says why


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_on_cuda_graphs(kind, cache, dtype):
    want, got, be, warned = generate_both(kind, cache, "cuda", dtype, "auto", new_tokens=16)
    if dtype == torch.float32:
        for tokens in got:
            assert torch.equal(tokens, want)
    else:  # bf16: greedy tokens may part where two logits tie within rounding; most must agree
        for tokens in got:
            assert (tokens == want).float().mean() > 0.8
    assert not warned, [str(w.message) for w in warned]
    counters = decode_counters(be)
    assert counters["replays"] >= 16 and counters["capture_failures"] == 0 and counters["piece_fallbacks"] == 0
