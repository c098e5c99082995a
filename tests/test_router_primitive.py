"""The router primitive (`ops/router.py`, `passes/rules/moe_gate.py`): every spelling of a router becomes one
`kunlun::router` node, a renormalisation and a scale written after it fold into its parameters, the fuse stage
turns it into `kunlun::moe_gate`, and what nothing fused goes back as its reference.

The routers below are written here, independently of the rules: `softmax(dim=1)` with an in-place
renormalisation, a biased sigmoid choice with the scale in the same expression, routing over [batch, seq,
experts] logits, a top-k of the logits with a scaled softmax over the k, an unsorted top-k renormalised, a
[1, E] correction bias.  Several are combinations no rule of the family had as a whole before the redesign.
Each is compiled with the backend and compared with eager (and the weights with float64).
"""
import pytest
import torch
from torch import nn

import kunlun_compile as kc
from kunlun_compile.passes.cleanup import fold_cast_round_trips
from kunlun_compile.passes.fusion import FAMILY_STAGES
from kunlun_compile.passes.pattern_engine import trace_aten
from kunlun_compile.passes.rewrites import limit_rewrites
from kunlun_compile.passes.rules import moe_gate as rules
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import compiled_and_eager, rel_err

ROUTER = torch.ops.kunlun.router.default
E, K = 16, 4


# ---- the primitive's meaning ----------------------------------------------------------------------------

def _float64_router(logits, bias, top_k, scoring, groups, topk_group, renormalize, scale):
    """Independent of `ops/router.py`: row by row in float64 with Python sorting."""
    rows = logits.double().reshape(-1, logits.shape[-1])
    weights, ids = [], []
    for row in rows:
        scores = torch.softmax(row, -1) if scoring == "softmax" else torch.sigmoid(row)
        choice = scores + (bias.double().reshape(-1) if bias is not None else 0)
        per_group = len(row) // groups
        if groups > 1:
            members = [sorted(choice[g * per_group:(g + 1) * per_group].tolist(), reverse=True) for g in range(groups)]
            group_scores = [sum(m[:2]) if bias is not None else m[0] for m in members]
            kept = sorted(range(groups), key=lambda g: group_scores[g], reverse=True)[:topk_group]
            allowed = [e for e in range(len(row)) if e // per_group in kept]
        else:
            allowed = list(range(len(row)))
        picked = sorted(allowed, key=lambda e: choice[e].item(), reverse=True)[:top_k]
        w = scores[picked]
        if renormalize:
            w = w / w.sum()
        weights.append(w * scale)
        ids.append(picked)
    shape = (*logits.shape[:-1], top_k)
    return torch.stack(weights).reshape(shape), torch.tensor(ids).reshape(shape)


@pytest.mark.parametrize("scoring, biased, groups, topk_group, renormalize, scale", [
    ("softmax", False, 1, 1, True, 1.0), ("sigmoid", False, 1, 1, False, 2.5), ("softmax", True, 1, 1, True, 1.0),
    ("sigmoid", True, 4, 2, True, 2.5), ("softmax", False, 4, 3, False, 1.0), ("sigmoid", True, 1, 1, True, 0.5),
])
def test_the_reference_picks_and_weights_as_float64_does(scoring, biased, groups, topk_group, renormalize, scale):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, E, generator=g) * 3  # leading dims: the primitive keeps them
    bias = torch.randn(E, generator=g) * 0.1 if biased else None
    args = (K, scoring, groups, topk_group, renormalize, scale)
    weights, ids = torch.ops.kunlun.router(logits, bias, *args)
    want_w, want_ids = _float64_router(logits, bias, *args)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and weights.shape == (3, 5, K)
    assert torch.equal(ids, want_ids)
    assert rel_err(weights, want_w) < 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_groups=3), "must divide the 16 experts"),
    (dict(top_k=9, num_groups=4, topk_group=2), "top_k=9 must be in"),
    (dict(scoring="relu"), "scoring must be one of"),
    (dict(bias=torch.randn(8)), "the bias must be 16 floats"),
])
def test_bad_arguments_are_refused_with_a_clear_error(kwargs, message):
    args = dict(bias=None, top_k=K, scoring="softmax", num_groups=1, topk_group=1, renormalize=False, scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        torch.ops.kunlun.router(torch.randn(5, E), *args.values())


# ---- routers written here -------------------------------------------------------------------------------

class Router(nn.Module):
    """A router after its linear layer, spelled one of several ways; returns weights in the logits' dtype and
    ids.  (The logits are the input: a compiled linear may round them unlike eager's, and one rounding step
    apart two experts swap places.)"""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.bias = nn.Parameter(torch.randn(1, E, generator=torch.Generator().manual_seed(7)) * 0.05)

    def forward(self, logits):
        return getattr(self, "_" + self.spelling)(logits, logits.dtype)

    def _dim1_inplace(self, logits, dtype):  # softmax over dim=1 of [T, E], renormalised in place
        probs = torch.softmax(logits, dim=1, dtype=torch.float)
        w, ids = torch.topk(probs, K, dim=1)
        w /= w.sum(dim=1, keepdim=True)
        return w.to(dtype), ids

    def _steered_scaled(self, logits, dtype):  # sigmoid scores, choice steered by a [1, E] bias, one expression
        scores = logits.float().sigmoid()
        idx = (scores + self.bias.float()).topk(K, dim=-1).indices
        w = torch.gather(scores, 1, idx)
        return (w / w.sum(dim=-1, keepdim=True) * 2.5).to(dtype), idx.to(torch.int32)

    def _three_d(self, logits, dtype):  # routing [batch, seq, experts] logits, no flatten first
        logits = logits.view(2, -1, E)
        w, ids = logits.softmax(dim=-1, dtype=torch.float32).topk(K, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(dtype), ids

    def _top_then_scaled_softmax(self, logits, dtype):  # top-k of the logits, a scaled softmax over the k
        top, ids = logits.float().topk(K, dim=-1)
        return (top.softmax(dim=-1) * 1.5).to(dtype), ids

    def _exp_logsumexp(self, logits, dtype):  # the chosen logits' softmax as exp(l - logsumexp), unsorted
        top, ids = logits.topk(K, sorted=False)
        return torch.exp(top - logits.logsumexp(-1, keepdim=True)).to(dtype), ids

    def _unsorted_renormalized(self, logits, dtype):  # an unsorted top-k, renormalised
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        w, ids = torch.topk(scores, k=K, dim=-1, sorted=False)
        return (w / w.sum(dim=-1, keepdim=True)).to(dtype), ids


def _logits(dtype=torch.float32, device="cpu"):
    return (torch.randn(6, E, generator=torch.Generator().manual_seed(3)) * 3).to(device=device, dtype=dtype)


def _compile(model, x):
    got, want, report, misses = compiled_and_eager(model, x)
    return got, want, report.graphs[0].patterns["moe_gate"], misses, report


def _sorted_by_id(weights, ids):
    """Ids in ascending order with their weights: an unsorted top-k may list the same picks in another order."""
    order = ids.argsort(-1)
    return weights.gather(-1, order), ids.gather(-1, order)


SPELLINGS = ["dim1_inplace", "steered_scaled", "three_d", "top_then_scaled_softmax", "unsorted_renormalized",
             "exp_logsumexp"]
ROUNDED = ("top_then_scaled_softmax", "exp_logsumexp")  # the op's softmax equals these to rounding, not to the bit


@pytest.mark.parametrize("kernel", ["reference", "interpreted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_independent_routers_fuse_into_one_kernel(spelling, dtype, kernel):
    """The op's reference computes as the model does (the same bits); the Triton kernel under the interpreter
    rounds its exp and sums its own way (within an ulp)."""
    model = Router(spelling).to(dtype).eval()
    with cpu_kernels(kernel == "interpreted"):
        (got_w, got_ids), (want_w, want_ids), fused, misses, report = _compile(model, _logits(dtype))
    assert fused == 1, misses
    assert got_ids.dtype == want_ids.dtype and got_w.dtype == want_w.dtype
    if spelling in ("unsorted_renormalized", "exp_logsumexp"):
        (got_w, got_ids), (want_w, want_ids) = _sorted_by_id(got_w, got_ids), _sorted_by_id(want_w, want_ids)
    assert torch.equal(got_ids, want_ids)
    if spelling in ROUNDED and dtype == torch.bfloat16:  # eager rounds each step in bf16: judged by float64
        with torch.no_grad():
            exact_w, exact_ids = Router(spelling).double()(_logits(dtype).double())
        if spelling == "exp_logsumexp":
            exact_w, _ = _sorted_by_id(exact_w, exact_ids)
        assert rel_err(got_w, exact_w) <= max(4e-3, 1.25 * rel_err(want_w, exact_w))
    elif spelling in ROUNDED or kernel == "interpreted":
        assert rel_err(got_w, want_w) < (1e-6 if dtype == torch.float32 else 8e-3)
    else:
        assert torch.equal(got_w, want_w)
    code = report.graphs[0].passes[-1].code_after if report.graphs[0].passes else ""
    assert "kunlun.router" not in code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_sigmoid_weights_of_a_top_k_fuse_to_the_bit(dtype):
    """Llama4's spelling, written out here: the chosen logits scattered into -inf, a sigmoid over the whole
    [tokens, experts] tensor.  The kernel's picks scattered into zeros are the same bits (sigmoid(-inf) = 0)."""

    class DenseSigmoid(nn.Module):
        def forward(self, logits):
            top, ids = logits.topk(K, dim=-1)
            dense = torch.full_like(logits, float("-inf")).scatter(1, ids, top)
            return torch.sigmoid(dense.float()).to(logits.dtype).t()

    with cpu_kernels(False):
        got, want, fused, misses, _ = _compile(DenseSigmoid().eval(), _logits(dtype))
    assert fused == 1, misses
    assert torch.equal(got, want)


def test_a_float32_router_inside_a_bf16_model_fuses():
    """HF's DeepSeek / Ernie / Dots1 routers run a float32 linear inside a bf16 model: the graph's inputs are all
    bf16, yet the router's scores are float32 without a cast before them.  The spellings' float32 forms are
    tried in every graph (`Rewrite.float32_in_any_graph`); patterns follow the inputs' dtypes otherwise."""

    class Float32Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Parameter(torch.randn(E, 32, generator=torch.Generator().manual_seed(5)))

        def forward(self, x):
            logits = torch.nn.functional.linear(x.float(), self.gate.float())
            return torch.topk(logits.sigmoid(), K, dim=-1)

    model = Float32Router().bfloat16().eval()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    with cpu_kernels(False):
        (got_w, got_ids), (want_w, want_ids), fused, misses, _ = _compile(model, x)
    assert fused == 1, misses
    assert torch.equal(got_ids, want_ids) and rel_err(got_w, want_w) < 1e-6


def test_the_models_cast_of_the_ids_back_to_int32_cancels():
    """The fused kernel's int32 ids are restored to the primitive's int64, then cast back by the model:
    `fold_cast_round_trips` leaves the kernel's ids, no cast kernel."""
    compiled = kc.compile(Router("steered_scaled").eval(), strict=True)
    with torch.no_grad():
        compiled(_logits())
    graph = compiled.kunlun_backend.report.graphs[0]
    code = next(p for p in graph.passes if p.name == "moe_gate").code_after
    assert "kunlun.moe_gate" in code and "torch.int64" not in code, code


def test_cast_round_trips_fold_only_through_an_exact_widening():
    def fn(ids, x):
        return ids.long().int(), ids.long().short(), x.bfloat16().float(), x.double().float()

    gm = trace_aten(fn, (torch.randint(0, 9, (4,), dtype=torch.int32), torch.randn(4)))
    assert fold_cast_round_trips(gm) == 2  # through int64 and float64; not int16 (narrows) nor bf16 (rounds)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ids, x = torch.randint(0, 9, (4,), dtype=torch.int32), torch.randn(4)
    for g, w in zip(gm(ids, x), fn(ids, x)):
        assert torch.equal(g, w)
    assert sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten._to_copy.default) == 4


def test_half_precision_scores_are_refused_with_a_near_miss():
    """A softmax in bf16 rounds the scores before the top-k, which may break ties unlike the kernel's float32
    scores: not a router the primitive stands for."""

    class HalfScores(nn.Module):
        def forward(self, logits):
            return torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)

    logits = _logits(torch.bfloat16)
    (got_w, got_ids), (want_w, want_ids), fused, misses, _ = _compile(HalfScores().eval(), logits)
    assert fused == 0 and torch.equal(got_w, want_w) and torch.equal(got_ids, want_ids)
    assert any("scores in torch.bfloat16, the primitive in float32" in line for line in misses), misses


def test_a_top_k_past_the_kept_groups_is_refused_with_a_near_miss():
    """top_k 5 of the 4 experts one kept group of 4 holds: the model's top-k then picks masked (-inf) experts,
    which the kernel cannot (its check would raise inside the pass)."""
    from kunlun_compile.passes.rules.moe_gate import select_experts

    class PastTheGroups(nn.Module):
        def forward(self, logits):
            return select_experts(logits, 5, "softmax", True, 4, 1, None, 1.0)

    (got_w, got_ids), (want_w, want_ids), fused, misses, _ = _compile(PastTheGroups().eval(), _logits())
    assert fused == 0 and torch.equal(got_ids, want_ids) and rel_err(got_w, want_w) < 1e-6
    assert any("top_k 5 of 4 experts that can be chosen" in line for line in misses), misses


def test_an_unfused_router_goes_back_as_its_reference_with_a_near_miss():
    """Under a bisect's limit of 0 the fuse stage takes nothing: the primitive is put back, the results are the
    model's, and a near miss names the spelling it was recognised as."""
    with limit_rewrites("moe_gate", 0) as log:
        (got_w, got_ids), (want_w, want_ids), fused, misses, report = _compile(Router("dim1_inplace").eval(), _logits())
    assert fused == 0 and log.made == [] and log.refused >= 1
    assert torch.equal(got_ids, want_ids) and rel_err(got_w, want_w) < 1e-6
    code = next(p for p in report.graphs[0].passes if p.name == "moe_gate").code_after
    assert "kunlun.router" not in code and "kunlun.moe_gate" not in code
    lines = [line for line in misses if line.startswith("moe_gate: ") and "left unfused" in line]
    assert len(lines) == 1 and "top-k of softmax scores" in lines[0], misses


def test_a_router_no_spelling_covers_is_explained_against_the_spellings():
    """A router the recognise stage does not know (here: a softmax over the tokens, not the experts) is compared
    with the spellings, not with the fuse stage's primitive-only pattern."""

    class TokenSoftmax(nn.Module):
        def forward(self, logits):
            return torch.topk(torch.softmax(logits, dim=0), K, dim=-1)

    _, _, fused, misses, _ = _compile(TokenSoftmax().eval(), _logits())
    assert fused == 0
    lines = [line for line in misses if line.startswith("moe_gate: topk")]
    assert len(lines) == 1 and "closest pattern router_" in lines[0] and "kunlun::router" not in lines[0], misses


def test_the_router_family_runs_its_stages_in_order():
    stages = FAMILY_STAGES["moe_gate"]
    assert [s.fuses for s in stages] == [False, False, True, False]
    assert stages[0].rules is rules.RECOGNISE and stages[2].rules is rules.FUSE and stages[-1].rules is rules.LOWER


@pytest.mark.gpu
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_independent_routers_on_cuda(spelling):
    """The moe_gate Triton kernel on the GPU: the same picks as eager, weights as close as eager to float64."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = Router(spelling).cuda().eval()
    (got_w, got_ids), (want_w, want_ids), fused, misses, _ = _compile(model, _logits(device="cuda"))
    assert fused == 1, misses
    if spelling in ("unsorted_renormalized", "exp_logsumexp"):
        (got_w, got_ids), (want_w, want_ids) = _sorted_by_id(got_w, got_ids), _sorted_by_id(want_w, want_ids)
    assert torch.equal(got_ids.long(), want_ids.long())
    assert rel_err(got_w, want_w) < 1e-6
