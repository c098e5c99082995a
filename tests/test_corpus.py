"""Third-party model corpus, HF transformers part: each architecture of tests/corpus/archs.py, in fp32 and bf16,
compiled with the backend (graph_mode="none", not strict) and run (the kunlun:: kernels through Triton's
interpreter on a CPU machine, see conftest.py).  Per model: no exception, no fallback, no
KunlunCompileWarning, logits within the dtype's limit of eager's, the families found exactly as the
registry's `found` table says, and for every family found fewer times than expected a near miss naming
it -- or, where the registry records the miss as silent, still none.

The slowest half of the architectures (`slow=True` in the registry) runs only with `-m slow`.
"""
import pytest

pytest.importorskip("transformers")

from kunlun_compile.passes.fusion import FAMILY_NAMES  # noqa: E402 - after the importorskip

from tests.corpus import run as corpus  # noqa: E402
from tests.corpus.archs import ARCHS, COUNTED, DTYPES, SLOW  # noqa: E402

CASES = [pytest.param(a, d, id=f"{a.name}-{d}", marks=[pytest.mark.slow] if a.slow else [])
         for a in ARCHS for d in DTYPES]


def test_registry_is_consistent():
    names = [a.name for a in ARCHS]
    assert len(names) == len(set(names)), "architecture names repeat"
    assert len(ARCHS) >= 25
    assert set(COUNTED) <= set(FAMILY_NAMES)
    assert set(SLOW) <= set(names), "SLOW names an architecture the registry lacks"
    for a in ARCHS:
        families = set(a.expected) | {f for d in a.found.values() for f in d} | set(a.silent_misses)
        assert families <= set(COUNTED), f"{a.name}: unknown families {families - set(COUNTED)}"
        assert set(a.found) <= set(DTYPES), f"{a.name}: found is keyed by dtype"
        for family in a.silent_misses:  # a silent miss that is no miss is a stale entry
            assert any(family in a.misses(d) for d in DTYPES), f"{a.name}: {family} is not missed, yet silent"


@pytest.mark.parametrize("arch,dtype", CASES)
def test_corpus_model(arch, dtype):
    row = corpus.run(arch, dtype)
    assert "build_error" not in row, row["build_error"]
    assert "error" not in row, row.get("traceback", row["error"])
    assert row["fallbacks"] == [], row["fallbacks"]
    assert row["warnings"] == [], row["warnings"]
    assert row["rel_err"] <= corpus.LIMITS[dtype], f"rel. error {row['rel_err']:.3e} vs eager"

    found = {f: row["patterns"].get(f, 0) for f in COUNTED}
    assert found == arch.found_counts(dtype), "the families found changed: update tests/corpus/archs.py"

    for family in arch.misses(dtype):
        lines = corpus.near_misses_of(row, family)
        if family in arch.silent_misses:
            assert not lines, f"{family}: recorded as a silent miss, but the backend now says why: {lines[:3]}"
        else:
            assert lines, f"{family}: missed, and no near miss names it (record it in silent_misses, with why)"


# A decode step traced with static sizes (batch 1, one token): size-1 dims make layouts ambiguous (a [B, S, H, D]
# table fits a heads-first reading too) and drop copies and views from the graph (a transpose of [1, E] is
# already laid out as its reshape wants; a mask's q dim has size 1).  Masks: most architectures build none for one
# query (those are not here); Gemma2 (soft-capped eager attention) builds its two 1 x 1 masks anyway.
ONE_TOKEN = ("Llama4", "DeepseekV3", "Qwen3Moe", "Qwen3", "Gemma2")
# what a one-token step finds beyond the registry's (2, 7) counts: Llama4's dense experts fuse at a small static
# token count (moe_experts.DENSE_FUSED_UP_TO_TOKENS), not at 14 tokens
ONE_TOKEN_MORE = {"Llama4": dict(moe_ffn=2)}


@pytest.mark.parametrize("name", ONE_TOKEN)
def test_one_token_decode_step_finds_the_same_fusions(name):
    arch = corpus.by_name(name)
    row = corpus.run(arch, "fp32", ids_shape=(1, 1))
    assert "error" not in row, row.get("traceback", row.get("error"))
    assert row["fallbacks"] == [] and row["warnings"] == [], (row["fallbacks"], row["warnings"])
    assert row["rel_err"] <= corpus.LIMITS["fp32"], f"rel. error {row['rel_err']:.3e} vs eager"
    found = {f: row["patterns"].get(f, 0) for f in COUNTED}
    assert found == dict(arch.found_counts("fp32"), **ONE_TOKEN_MORE.get(name, {})), row["near_misses"]
