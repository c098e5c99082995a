"""A rule's `needs` (ops whose absence from a graph skips tracing and searching the rule) must all be
in its traced pattern, for every dtype it is traced for; otherwise a graph the rule matches would
never be searched.  And the needs do their job: a softmax router's graph traces no sigmoid variant."""
import pytest
import torch

from kunlun_compile.passes import pattern_engine as pe
from kunlun_compile.passes.fusion import FAMILY_RULES

RULES = [(family, rule) for family, rules in FAMILY_RULES.items() for rule in rules]


def _pattern_ops(compiled) -> set:
    return {f for q in pe._pattern_nodes(compiled.strict) for f in q.fns}


@pytest.mark.parametrize("family, rule", RULES, ids=[f"{f}/{r.name}" for f, r in RULES])
def test_needs_are_ops_of_the_pattern(family, rule):
    for dtype in rule.dtypes or (torch.float32,):
        missing = [str(op) for op in rule.needs if op not in _pattern_ops(pe.compiled_pattern(rule, dtype))]
        assert not missing, f"{family}/{rule.name} ({dtype}) needs {missing}, which its pattern does not have"


def test_variants_are_told_apart_by_their_needs():
    by_name = {r.name: r for _, r in RULES}
    softmax_graph = {torch.ops.aten.topk.default, torch.ops.aten._softmax.default, torch.ops.aten.sum.dim_IntList}
    searched = [r.name for r in FAMILY_RULES["moe_gate"] if all(op in softmax_graph for op in r.needs)]
    assert sorted(searched) == sorted(["router_softmax_top", "router_top_then_softmax",
                                       "router_top_then_softmax_in_dtype"])
    assert torch.ops.aten.stack.default in by_name["plain_qknorm_gptj"].needs
    assert torch.ops.aten.stack.default not in by_name["plain_qknorm_neox"].needs
