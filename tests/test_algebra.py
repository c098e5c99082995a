"""passes/algebra.py: arithmetic respelled for matching, and put back where nothing fused it."""
import pytest
import torch
import torch.nn as nn

import kunlun_compile as kc
from kunlun_compile.passes import algebra
from torch.fx.experimental.proxy_tensor import make_fx

from .conftest import float64_reference, rel_err

aten = torch.ops.aten
EPS = 1e-6


# RMSNorm as people write it: each a different spelling of the square, the mean and the inverse root
def norm_pow_mean_rsqrt(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def norm_self_product_div_sqrt(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def norm_sum_over_n_reciprocal(x, w):
    return x * torch.sqrt(x.square().sum(-1, keepdim=True) / x.shape[-1] + EPS).reciprocal() * w


def norm_float_upcast_div_sqrt(x, w):
    """The HF dtype dance, with the division spelling: float32 inside, cast back, then the weight."""
    xf = x.float()
    return w * (xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) / xf.shape[-1] + EPS)).to(x.dtype)


def norm_float_upcast_reciprocal(x, w):
    """vLLM's order (cast back, then the weight), the root inverted by `reciprocal`."""
    xf = x.float()
    return (xf * torch.sqrt((xf * xf).mean(-1, keepdim=True) + EPS).reciprocal()).to(x.dtype) * w


SPELLINGS = [norm_pow_mean_rsqrt, norm_self_product_div_sqrt, norm_sum_over_n_reciprocal, norm_float_upcast_div_sqrt,
             norm_float_upcast_reciprocal]
UPCASTING = [norm_float_upcast_div_sqrt, norm_float_upcast_reciprocal]  # half inputs: the square sums in float32


class Wrap(nn.Module):
    def __init__(self, fn, n):
        super().__init__()
        self.fn, self.weight = fn, nn.Parameter(torch.randn(n))

    def forward(self, x):
        return self.fn(x, self.weight)


@pytest.mark.parametrize("fn", SPELLINGS, ids=lambda f: f.__name__)
def test_every_spelling_of_rmsnorm_fuses_with_eager_numbers(fn):
    model = Wrap(fn, 64).eval().requires_grad_(False)
    x = torch.randn(7, 64) * 3
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert compiled.kunlun_backend.report.graphs[0].patterns["add_rmsnorm"] == 1
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("fn", UPCASTING, ids=lambda f: f.__name__)
def test_upcasting_spellings_fuse_in_bf16_as_close_to_float64_as_eager(fn):
    model = Wrap(fn, 64).to(torch.bfloat16).eval().requires_grad_(False)
    x = (torch.randn(7, 64) * 3).to(torch.bfloat16)
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    ref = float64_reference(model, (x,))
    assert compiled.kunlun_backend.report.graphs[0].patterns["add_rmsnorm"] == 1
    assert rel_err(got, ref) <= max(8e-3, 1.25 * rel_err(want, ref))


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def unfused_arithmetic(x, y):
    """Every rewritten spelling, none of them inside anything a rule fuses."""
    a = x * x + y
    b = y.sum(-1, keepdim=True) / y.shape[-1]
    c = torch.sqrt(a.abs() + 1).reciprocal()
    return x / torch.sqrt(y.abs() + 2) + b * c


def trace_aten(fn, args):
    """The ATen graph as traced, before any canonical form."""
    return make_fx(fn)(*args)


def test_normalise_then_restore_gives_the_models_graph_back_bit_for_bit():
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    gm = trace_aten(unfused_arithmetic, (x, y))
    before = sorted(map(str, _ops(gm)))
    assert algebra.normalise(gm) == 4
    ops = _ops(gm)
    assert aten.rsqrt.default in ops and aten.mean.dim in ops and aten.pow.Tensor_Scalar in ops
    assert aten.sqrt.default not in ops and aten.reciprocal.default not in ops
    assert algebra.restore(gm).matches == 4
    assert sorted(map(str, _ops(gm))) == before
    assert not any(algebra.MARK in n.meta for n in gm.graph.nodes)
    assert torch.equal(gm(x, y), unfused_arithmetic(x, y))


def test_unfused_arithmetic_compiles_to_eagers_bits():
    """With the fusion passes on and nothing for them to fuse, the respelled nodes go back: the ATen graph
    handed on computes eager's bits (the element-wise lowering is left out: the interpreter rounds its own
    way).  On this CPU, without the restore pass, the result moves by an ulp (rsqrt vs 1 / sqrt)."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    compiled = kc.compile(unfused_arithmetic, strict=True, disable=("lower_elementwise",))
    got, want = compiled(x, y), unfused_arithmetic(x, y)
    record = {p.name: p for p in compiled.kunlun_backend.report.graphs[0].passes}["restore_algebra"]
    assert record.matches == 4
    assert torch.equal(got, want)


def test_a_division_whose_root_a_fusion_kept_as_an_input_stays_multiplied():
    """`x / sqrt(v)` became `x * rsqrt(v)`: if a fusion took the product but kept the rsqrt as its input, the
    rsqrt must stay an rsqrt (turning it back into sqrt would feed the fused op the wrong value)."""
    x, v = torch.randn(5, 8), torch.rand(5, 8) + 0.5
    gm = trace_aten(lambda x, v: x / torch.sqrt(v), (x, v))
    algebra.normalise(gm)
    (mul,) = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor]
    with gm.graph.inserting_before(mul):  # a stand-in for a fused op that consumed the product
        fused = gm.graph.call_function(aten.sub.Tensor, mul.args)
    fused.meta["val"] = mul.meta["val"]
    mul.replace_all_uses_with(fused)
    gm.graph.erase_node(mul)
    algebra.restore(gm)
    assert aten.rsqrt.default in _ops(gm) and aten.sqrt.default not in _ops(gm)
    torch.testing.assert_close(gm(x, v), x - torch.rsqrt(v))


def test_sum_over_a_count_that_is_not_the_summed_size_is_no_mean():
    x = torch.randn(5, 8)
    gm = trace_aten(lambda x: x.sum(-1, keepdim=True) / 7, (x,))
    assert algebra.normalise(gm) == 0 and aten.mean.dim not in _ops(gm)
    half = torch.randn(5, 8).to(torch.bfloat16)  # a bf16 sum rounds before the division: a mean would not
    gm = trace_aten(lambda x: x.sum(-1, keepdim=True) / 8, (half,))
    assert algebra.normalise(gm) == 0


def test_a_bool_or_integer_self_product_is_left_alone():
    mask, ids = torch.rand(5, 8) > 0.5, torch.randint(0, 9, (5, 8))
    gm = trace_aten(lambda m, i: (m * m, i * i), (mask, ids))
    assert algebra.normalise(gm) == 0
    got = gm(mask, ids)
    assert torch.equal(got[0], mask & mask) and torch.equal(got[1], ids * ids)
