"""`--no-fusion` on whole models: the generic lowering alone leaves only what it is meant to leave.

With every fusion pass off, the graphs of the built-in models (MoE ones too) and of HF architectures
(default settings, MoE ones with their grouped-GEMM dispatch) keep as ATen only matmuls, attention, sort,
top-k and grouped GEMMs; everything else -- norms, softmax, rotary with
its cat of slices, the rotary table, masks, the embedding, the KV cache's cats -- is generated kernels.
Each model still matches eager.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.models import build_model, builtin_names

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from aten_left import KEPT, aten_left  # noqa: E402 - the benchmark's own classification, shared

def _left(report) -> dict:
    total = {}
    for g in report.graphs:
        for op, n in aten_left(g.passes[-1].code_after).items():
            if op.split(".")[0] not in KEPT:
                total[op] = total.get(op, 0) + n
    return total


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_models_keep_only_matmuls_attention_and_topk(name):
    """MoE built-ins included: the expert GEMMs stay bmm, the router's top-k stays; the gathers of expert
    weights, DeepSeek's group mask (a scatter of ones) and its stacks are generated."""
    model, inputs = build_model(name, dtype=torch.float32, seed=1)
    compiled = kc.compile(model, fusion=False, strict=True, graph_mode="none")
    with torch.no_grad():
        got, want = compiled(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _left(compiled.kunlun_backend.report) == {}


def _hf_generic_only(arch: str):
    """The corpus architecture compiled with every fusion pass off: it matches eager and leaves only what the
    generic path keeps; its report."""
    pytest.importorskip("transformers")
    from .corpus.archs import ARCHS
    from .corpus.run import build, input_ids

    model = build(next(a for a in ARCHS if a.name == arch), torch.float32)
    ids = input_ids()
    compiled = kc.compile(model, fusion=False, strict=True, graph_mode="none")
    with torch.no_grad():
        got, want = compiled(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = compiled.kunlun_backend.report
    assert _left(report) == {}
    return report


@pytest.mark.parametrize("arch", ["Llama", "Qwen3", "Glm"])
def test_hf_dense_models_keep_only_matmuls_and_attention(arch):
    report = _hf_generic_only(arch)
    kinds = {}
    for g in report.graphs:
        for k, v in g.kernels.items():
            kinds[k] = kinds.get(k, 0) + v
    assert kinds["fused"] == 0 and kinds["pointwise"] > 0
    listings = "\n".join(k["listing"] for g in report.graphs for k in g.generated)
    assert "reduce.sum" in listings  # the norms are row kernels
    assert "iota" in listings and "] if " in listings  # cats: guarded loads of each branch, a select


@pytest.mark.parametrize("arch", ["Qwen3Moe", "GptOss"])
def test_hf_moe_models_keep_only_matmuls_attention_sort_and_grouped_gemms(arch):
    """transformers' default (grouped-GEMM) expert path: its dispatch -- the sort of the expert ids (ranks: 28
    ids here), the running counts of the histogram, the inverse permutation (the rank), the gathers -- is
    generated; top-k and the grouped GEMMs stay."""
    report = _hf_generic_only(arch)
    listings = "\n".join(k["listing"] for g in report.graphs for k in g.generated)
    assert "reduce.sum" in listings and "store out" in listings and "[%" in listings
    code = "\n".join(g.passes[-1].code_after for g in report.graphs)
    assert not any(f"aten.{op}." in code for op in ("sort", "histc", "cumsum", "index_put")), code


@pytest.mark.parametrize("arch, constructs", [
    ("DeepseekV2", ["cos", "sin"]),  # complex rotary as real pairs; MLA's q/k written by slice assignments
    ("Llama4", ["cos", "sin"]),  # complex rotary; the router's scatter of top-k scores, tokens repeated per expert
    # the causal conv's shifted taps, chunk pads, the state copies; the triangular solve stays (a matmul-class
    # library call).  ~2 min through Triton's interpreter: in the slow run
    pytest.param("Qwen3Next", ["] if "], marks=pytest.mark.slow),
], ids=["DeepseekV2", "Llama4", "Qwen3Next"])
def test_hf_models_with_complex_rotaries_slice_writes_and_linear_attention_keep_only_kept_ops(arch, constructs):
    report = _hf_generic_only(arch)
    listings = "\n".join(k["listing"] for g in report.graphs for k in g.generated)
    assert all(c in listings for c in constructs)
