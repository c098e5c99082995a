"""Traced patterns on disk (passes/pattern_cache.py) and the checks that skip patterns a graph cannot hold.

The cache must give back exactly the pattern a fresh trace gives, treat its files as untrusted data, and
the skipping must never change what a pass finds or reports."""
import contextlib
import functools
import json
import warnings

import pytest
import torch
from torch._dispatch.python import enable_python_dispatcher

import kunlun_compile as kc
from kunlun_compile.models import build_model, builtin_names
from kunlun_compile.passes import pattern_cache
from kunlun_compile.passes import pattern_engine as pe
from kunlun_compile.passes.fusion import FAMILY_RULES

ALL_RULES = [r for rules in FAMILY_RULES.values() for r in rules]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KUNLUN_COMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KUNLUN_COMPILE_PATTERN_CACHE", raising=False)
    monkeypatch.setattr(pattern_cache, "_memo", {})
    pattern_cache._folder.cache_clear()
    pe._compiled.cache_clear()
    yield tmp_path
    pattern_cache._folder.cache_clear()
    pe._compiled.cache_clear()


def _first_dtype(rule):
    return (rule.dtypes or (torch.float32,))[0]


def test_every_rule_loads_back_as_the_pattern_it_traced(fresh_cache):
    for rule in ALL_RULES:
        dtype = _first_dtype(rule)
        traced = pe.compile_rewrite(rule, dtype)  # traces and stores
        pattern_cache._memo.clear()
        loaded = pe.compile_rewrite(rule, dtype)  # reads the entry
        assert repr(loaded.strict) == repr(traced.strict), rule.name
        assert repr(loaded.relaxed) == repr(traced.relaxed), rule.name
    assert pattern_cache.stats["loaded"] >= len(ALL_RULES)
    assert len(list(fresh_cache.glob("patterns/*/*.json"))) == len(ALL_RULES)


def _one_entry(fresh_cache):
    rule = next(r for r in ALL_RULES if r.name == "vllm_residual")
    pe.compile_rewrite(rule, torch.float32)
    (path,) = fresh_cache.glob("patterns/*/*.json")
    pattern_cache._memo.clear()
    return rule, path


def test_an_edited_entry_is_rejected_with_one_warning_and_traced_again(fresh_cache):
    rule, path = _one_entry(fresh_cache)
    entry = json.loads(path.read_text())
    entry["graph"]["nodes"][-2]["name"] = "edited"
    path.write_text(json.dumps(entry))
    want = repr(pe.compile_rewrite.__wrapped__(rule, torch.float32).strict) if hasattr(
        pe.compile_rewrite, "__wrapped__") else None
    with pytest.warns(UserWarning, match="pattern cache entry .* rejected .*hash mismatch"):
        got = pe.compile_rewrite(rule, torch.float32)
    assert want is None or repr(got.strict) == want
    assert json.loads(path.read_text())["graph"]["nodes"][-2]["name"] != "edited"  # overwritten


def test_an_entry_calling_outside_the_allow_list_is_never_built(fresh_cache):
    """Whoever can write the folder can recompute the hash: the allow-list still stands."""
    rule, path = _one_entry(fresh_cache)
    entry = json.loads(path.read_text())
    node = next(d for d in entry["graph"]["nodes"] if d["op"] == "call_function")
    node["target"] = {"py": "os", "name": "system"}
    entry["sha256"] = pattern_cache._digest(entry["graph"])
    path.write_text(json.dumps(entry))
    with pytest.warns(UserWarning, match="rejected .*UntrustedGraphError"):
        compiled = pe.compile_rewrite(rule, torch.float32)
    assert "system" not in repr(compiled.strict)


def test_no_disk_when_switched_off(fresh_cache, monkeypatch):
    monkeypatch.setenv("KUNLUN_COMPILE_PATTERN_CACHE", "0")
    pe.compile_rewrite(ALL_RULES[0], _first_dtype(ALL_RULES[0]))
    assert not list(fresh_cache.glob("patterns/*/*.json"))


def test_old_source_versions_are_pruned(fresh_cache):
    root = fresh_cache / "patterns"
    root.mkdir()
    for i in range(pattern_cache.VERSIONS_KEPT + 2):
        (root / f"old{i}").mkdir()
    pe.compile_rewrite(ALL_RULES[0], _first_dtype(ALL_RULES[0]))
    assert len([p for p in root.iterdir() if p.is_dir()]) == pattern_cache.VERSIONS_KEPT


def _report(model, inputs):
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = kc.compile(model, graph_mode="none")
        compiled(*inputs)
    return [(dict(g.patterns), sorted(m for p in g.passes for m in p.near_misses))
            for g in compiled.kunlun_backend.report.graphs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skipping_patterns_changes_no_match_and_no_near_miss(dtype, monkeypatch):
    for name in builtin_names():
        model, inputs = build_model(name, dtype=dtype, device="cpu", num_tokens=8, seed=0)
        skipped = _report(model, inputs)
        monkeypatch.setattr(pe, "SKIP_PATTERNS_THAT_CANNOT_MATCH", False)
        tried = _report(model, inputs)
        monkeypatch.setattr(pe, "SKIP_PATTERNS_THAT_CANNOT_MATCH", True)
        assert skipped == tried, name


def test_one_replacement_trace_serves_every_layer(monkeypatch):
    """Layers with equal static shapes share the replacement's trace (and nothing is kept after the pass)."""
    traces = []
    real = pe.trace_aten
    monkeypatch.setattr(pe, "trace_aten", lambda fn, args: traces.append((fn, args)) or real(fn, args))
    model, inputs = build_model("qwen3-tiny", dtype=torch.float32, device="cpu", num_tokens=8, seed=0)
    (patterns, _), = _report(model, inputs)
    assert patterns["add_rmsnorm"] == 5 and patterns["norm_rope_gate"] == 2
    # the two layers' matches of a rule (fusing, or making a primitive) replay one trace per shape
    keys = [(f.func, repr(sorted(f.keywords.items())), [tuple(a.shape) for a in args if hasattr(a, "shape")])
            for f, args in traces if isinstance(f, functools.partial)]
    assert len(keys) == len({repr(k) for k in keys}), keys
    assert not pe._replacements


AMBIENTS = {
    "plain": contextlib.nullcontext,
    "inference_mode": torch.inference_mode,
    "below_autograd": torch._C._AutoDispatchBelowAutograd,  # inside vLLM's compile
    "python_dispatcher": enable_python_dispatcher,  # inside AOT autograd and inductor
}
# Rules whose search function calls a composite op that decomposes differently by dispatch state
# (one_hot: range asserts; rms_norm in bf16: another path below autograd).
STATE_DEPENDENT = [r for r in ALL_RULES if r.name in ("sorted_one_hot_grouped_mm", "rmsnorm_torch")]


@pytest.mark.parametrize("first", list(AMBIENTS))
def test_a_pattern_stored_in_one_dispatch_state_is_never_served_in_another(fresh_cache, first):
    """CI failure of stop 45: a pattern traced outside a compile (plain state) was stored and then served to a
    compile, whose graph had been traced in another state; the MoE experts were left unfused.  Whatever state
    stored the entry, each state gets what a fresh trace in that state gives."""
    assert len(STATE_DEPENDENT) == 2
    for rule in STATE_DEPENDENT:
        for dtype in rule.dtypes:
            with AMBIENTS[first]():
                pe.compiled_pattern(rule, dtype)
            for state, ambient in AMBIENTS.items():
                with ambient():
                    served = pe.compiled_pattern(rule, dtype)
                    fresh = _traced_without_cache(rule, dtype)
                assert repr(served.strict) == repr(fresh.strict), (rule.name, dtype, first, state)


def _traced_without_cache(rule, dtype):
    saved = dict(pattern_cache._memo)
    pattern_cache._memo.clear()
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("KUNLUN_COMPILE_PATTERN_CACHE", "0")
            return pe.compile_rewrite(rule, dtype, pe.resolved_aliases(rule))
    finally:
        pattern_cache._memo.clear()
        pattern_cache._memo.update(saved)


def test_the_dispatch_state_names_what_changes_a_trace():
    plain = pattern_cache.dispatch_state()
    with enable_python_dispatcher():
        assert pattern_cache.dispatch_state() == plain  # trace_pattern turns it on itself
    with torch.inference_mode():
        inference = pattern_cache.dispatch_state()
    with torch._C._AutoDispatchBelowAutograd():
        below = pattern_cache.dispatch_state()
    assert plain != inference and plain != below
