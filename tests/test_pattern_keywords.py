"""A graph node's keywords that a pattern does not spell must hold their defaults, or the match is refused with
the keyword named.  Inductor's matcher drops them before comparing, so without the check `F.gelu(x)` matched
`F.gelu(x, approximate="tanh")`, `a + b` matched `torch.add(a, b, alpha=2)`, `x.sum(-1)` matched a sum in
float32 of a bf16 x -- replacements computing something else, silently."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kunlun_compile.passes.pattern_engine import Rewrite, apply_rewrites, trace_aten


def _rule(name, search, example_inputs):
    # the replacement is the search function itself: whether it ran is read off the outcome (patterns are
    # cached by rule name: one name per search)
    return Rewrite(family="probe", name=f"keyword_probe_{name}", search=search, replace=search,
                   example_inputs=example_inputs)


def _outcome(model_fn, args, rule):
    gm = trace_aten(model_fn, args)
    return apply_rewrites(gm, [rule], fuses=False)


def _two(dtype):
    return torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype)


@pytest.mark.parametrize("alpha", [1, 2])
def test_add_with_alpha(alpha):
    rule = _rule("add", lambda x, y: x + y, _two)
    out = _outcome(lambda x, y: torch.add(x, y, alpha=alpha), _two(torch.float32), rule)
    if alpha == 1:
        assert out.matches == 1
    else:
        assert out.matches == 0 and any("alpha=2" in m for m in out.near_misses), out.near_misses


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_approximation(approximate):
    rule = _rule("gelu", lambda x, y: F.gelu(x) * y, _two)
    out = _outcome(lambda x, y: F.gelu(x, approximate=approximate) * y, _two(torch.float32), rule)
    assert out.matches == (1 if approximate == "none" else 0)
    if approximate == "tanh":
        assert any("approximate='tanh'" in m for m in out.near_misses), out.near_misses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sum_with_a_dtype(dtype):
    """`dtype=float32` is a no-op on a float32 x and a wider accumulation and result on a bf16 one."""
    rule = _rule("sum", lambda x: x.sum(-1), lambda d: (torch.randn(3, 8, dtype=d),))
    out = _outcome(lambda x: x.sum(-1, dtype=torch.float32), (torch.randn(3, 8, dtype=dtype),), rule)
    assert out.matches == (1 if dtype == torch.float32 else 0), out.near_misses
