"""passes/explain_anchors.py: the spellings of a family's work that no rule has still leave a near-miss
line naming the family and saying what was left (rotations without `-x2`, complex rotations, routers
without top-k, dense experts), and nothing else gets one: a model that fuses, an unrelated cat, an
attention bmm, a greedy argmax.

Each case is compiled with the backend (strict) and its output checked against eager: a line says a
subgraph was left alone, which must not change what it computes.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kunlun_compile as kc
from kunlun_compile.models import build_model

from .conftest import rel_err

WHY_PROLOGUE = "left unfused; no pattern of the family covers this spelling of the prologue"


def _compile(model, *inputs):
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        got = compiled(*inputs)
        want = model(*inputs)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert rel_err(g, w) < 1e-5
    return [line for g in compiled.kunlun_backend.report.graphs for p in g.passes for line in p.near_misses]


def _unfused(lines, family):
    return [line for line in lines if line.startswith(f"{family}: ") and "left unfused" in line]


def _randn(*shape):
    return torch.randn(*shape)


# ---- rotations without rotate_half ------------------------------------------------------------------------

class ChunkRotary(nn.Module):
    """GptOss: x1, x2 = chunk(2); cat(x1 cos - x2 sin, x2 cos + x1 sin), half-width tables."""

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate(x):
            x1, x2 = torch.chunk(x, 2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotate(q), rotate(k)


class EvenOddRotary(nn.Module):
    """DeepSeek-V3's apply_rotary_pos_emb_interleave: even/odd slices, then a cat, or the pairs put back
    in place (stack + flatten, or a cat of unsqueezed halves + flatten)."""

    def __init__(self, join: str):
        super().__init__()
        self.join = join

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rotate(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
            if self.join == "stack":
                return torch.stack((o1, o2), dim=-1).flatten(-2)
            if self.join == "interleave":  # the pairs put back in place with a cat of unsqueezed halves
                return torch.cat((o1.unsqueeze(-1), o2.unsqueeze(-1)), dim=-1).flatten(-2)
            return torch.cat([o1, o2], dim=-1)
        return rotate(q), rotate(k)


def _rope_args():
    return _randn(2, 4, 5, 16), _randn(2, 2, 5, 16), _randn(2, 5, 8), _randn(2, 5, 8)


def _q_only(model):
    """The rotation of q alone: no pair of rotations for a prologue rule to take, so a near miss describes it."""
    class QOnly(nn.Module):
        def forward(self, q, k, cos, sin):
            return model(q, q[:, :0], cos, sin)[0]
    return QOnly()


def test_a_chunked_rotation_without_neg_is_described():
    lines = _unfused(_compile(_q_only(ChunkRotary()), *_rope_args()), "norm_rope_gate")
    assert len(lines) == 1, lines
    assert "(rotary rotation, halves without rotate_half (x1*cos - x2*sin, x2*cos + x1*sin, no -x2) into a cat, " \
           "of float32 [2, 4, 5, 16] with cos float32 [2, 1, 5, 8]) left unfused" in lines[0], lines


@pytest.mark.parametrize("join", ["cat", "stack", "interleave"])
def test_an_even_odd_rotation_is_described(join):
    lines = _unfused(_compile(_q_only(EvenOddRotary(join)), *_rope_args()), "norm_rope_gate")
    assert len(lines) == 1, lines
    joined = {"stack": "a stack,", "interleave": "a cat,", "cat": "a cat (results de-interleaved),"}[join]
    assert "even/odd slices without rotate_half" in lines[0] and f"into {joined} of float32" in lines[0], lines
    assert WHY_PROLOGUE in lines[0], lines  # q alone: no pair of rotations for a prologue rule


@pytest.mark.parametrize("model", [ChunkRotary(), EvenOddRotary("stack"), EvenOddRotary("cat")],
                         ids=["chunk", "pairs", "pairs_out_as_halves"])
def test_q_and_k_rotations_sharing_tables_fuse_without_a_transpose(model):
    """The same rotations of q and k (GptOss's spelling; GPT-J pairs), their tables shared: one kernel."""
    lines = _compile(model, *_rope_args())
    assert _unfused(lines, "norm_rope_gate") == [], lines


class ComplexRotary(nn.Module):
    """Llama4 / DeepSeek-V2: view_as_complex(q.float()) * freqs_cis, view_as_real, flatten, type_as."""

    def forward(self, q, k, freqs):
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)[:, :, None, :]  # [B, S, 1, D/2]

        def rotate(x):
            x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(x_ * freqs_cis).flatten(3).type_as(x)
        return rotate(q), rotate(k)


def test_a_complex_rotation_fuses_and_leaves_nothing_to_describe():
    q, k, freqs = _randn(2, 5, 4, 16), _randn(2, 5, 2, 16), _randn(2, 5, 8)
    lines = _compile(ComplexRotary(), q, k, freqs)
    assert _unfused(lines, "norm_rope_gate") == [], lines  # the rotation is a primitive, q's and k's fuse


def test_a_refused_complex_rotation_says_why():
    """A complex128 table (float64 angles): the primitive's float32 arithmetic would not be the model's."""
    q, k, freqs = _randn(2, 5, 4, 16), _randn(2, 5, 2, 16), _randn(2, 5, 8).double()
    lines = _compile(ComplexRotary(), q, k, freqs)
    assert any("rotary_complex_pairs: the complex table is torch.complex128, not complex64" in m for m in lines), \
        lines


# ---- routers without top-k ----------------------------------------------------------------------------------

def _sparsemixer(scores, eps=0.01):
    """Phimoe's sparsemixer in eval: two rounds of max + relative-threshold mask + softmax + gather."""
    threshold, first = scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    gates = torch.softmax(scores.masked_fill((threshold - scores) / factor > 2 * eps, float("-inf")), dim=-1)
    w1 = gates.gather(dim=-1, index=first)
    masked = torch.scatter(scores, -1, first, float("-inf"))
    threshold, second = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    gates = torch.softmax(masked.masked_fill((threshold - scores) / factor > 2 * eps, float("-inf")), dim=-1)
    w2 = gates.gather(dim=-1, index=second)
    return torch.cat((w1, w2), dim=-1), torch.cat((first, second), dim=-1)


class SparsemixerRouters(nn.Module):
    def __init__(self, layers=2, hidden=32, experts=6):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(hidden, experts, bias=False) for _ in range(layers))

    def forward(self, x):
        out = []
        for gate in self.gates:
            weights, ids = _sparsemixer(gate(x))
            out += [weights, ids.float()]
            x = x * 2
        return tuple(out)


def test_a_router_without_topk_is_described_once_per_router():
    lines = _unfused(_compile(SparsemixerRouters().eval().requires_grad_(False), _randn(9, 32)), "moe_gate")
    assert len(lines) == 2, lines  # one per router, not one per max
    assert all("(router without top-k: 2 rounds of aten::max.dim over the experts of float32 [9, 6] logits, "
               "each pick weighted by a gather from a (masked) softmax) left unfused; no pattern of the family "
               "covers a router that picks its experts with max instead of top-k" in line for line in lines), lines


class MaxButNoRouter(nn.Module):
    """A max over the last dim for stability (indices unused) and a greedy argmax over the vocabulary."""

    def forward(self, x, w):
        logits = x @ w
        stable = logits - logits.max(dim=-1, keepdim=True).values
        return stable.exp(), logits.argmax(dim=-1)


def test_a_max_that_picks_no_expert_is_no_router():
    lines = _compile(MaxButNoRouter(), _randn(9, 32), _randn(32, 100))
    assert not _unfused(lines, "moe_gate"), lines


# ---- dense experts --------------------------------------------------------------------------------------------

class DenseExperts(nn.Module):
    """Llama4TextExperts: every token through every expert, bmm against the whole [E, H, 2I] weights."""

    def __init__(self, experts=4, hidden=32, inter=48):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inter) / hidden ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, inter, hidden) / inter ** 0.5)

    def forward(self, x, scores):
        x = (x.repeat(self.gate_up_proj.shape[0], 1) * scores.transpose(0, 1).reshape(-1, 1))
        x = x.view(self.gate_up_proj.shape[0], -1, x.shape[-1])
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(up * F.silu(gate), self.down_proj).view(-1, x.shape[-1])


def test_dense_experts_are_described():
    model = DenseExperts().eval().requires_grad_(False)
    lines = _unfused(_compile(model, _randn(6, 32), torch.rand(6, 4)), "moe_ffn")
    assert len(lines) == 2, lines  # the gate/up and the down GEMM
    why = ("every token through every expert (no gather, no grouped GEMM)) left unfused; no pattern of the family "
           "covers dense experts weighted by anything but a top-1 router's picks")
    assert "dense experts, the gate/up GEMM: bmm of float32 [4, 6, 32] by the whole float32 [4, 32, 96]" in lines[0]
    assert "dense experts, the down GEMM: bmm of float32 [4, 6, 48] by the whole float32 [4, 48, 32]" in lines[1]
    assert all(why in line for line in lines), lines


@torch.library.custom_op("kunlun_test::cpu_fused_moe", mutates_args=("out",))
def _framework_fused_moe(out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """A serving framework's own experts kernel, written into a buffer (as vLLM's `_C.cpu_fused_moe`)."""
    out.copy_(torch.ops.kunlun.fused_moe(x, w13, w2, topk_weights, topk_ids, "silu"))


class FrameworkExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w13, self.w2 = nn.Parameter(torch.randn(4, 48, 32) / 6), nn.Parameter(torch.randn(4, 32, 24) / 5)

    def forward(self, x, weights, ids):
        out = torch.empty_like(x)
        torch.ops.kunlun_test.cpu_fused_moe(out, x, self.w13, self.w2, weights, ids)
        return out


def test_a_frameworks_opaque_experts_op_is_described():
    """vLLM's CPU experts: one opaque op, functionalized around its output buffer -- said so, not silent."""
    model = FrameworkExperts().eval().requires_grad_(False)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(6)])
    lines = _unfused(_compile(model, _randn(6, 32), torch.rand(6, 2), ids), "moe_ffn")
    assert len(lines) == 1, lines
    assert "kunlun_test::cpu_fused_moe: the routed experts as one opaque kernel) left unfused; the experts are " \
           "already one fused kernel of the serving framework" in lines[0]


class BmmAttention(nn.Module):
    """Attention written with bmm on 3-D inputs: a bmm against a 3-D placeholder that is no expert weight."""

    def forward(self, q, k, v, w):
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1)
        return torch.bmm(torch.bmm(p, v), w)


def test_an_attention_bmm_is_no_expert_gemm():
    lines = _compile(BmmAttention(), _randn(4, 5, 16), _randn(4, 5, 16), _randn(4, 5, 16), _randn(4, 16, 8))
    assert not _unfused(lines, "moe_ffn"), lines


# ---- what must stay silent ------------------------------------------------------------------------------------

class UnrelatedCats(nn.Module):
    """A KV-cache cat, MLA's cat(q_pass, q_rot), and a cat of a difference and a sum of unrelated products."""

    def forward(self, past, k, q_pass, q_rot, a, b, c, d):
        cache = torch.cat([past, k], dim=-2)
        q = torch.cat([q_pass, q_rot], dim=-1)
        mixed = torch.cat([a * b - c * d, a * c + b * b], dim=-1)  # shares factors, but no halves-and-tables
        return cache, q, mixed


def test_unrelated_cats_are_no_rotation():
    x = _randn(2, 4, 5, 16)
    lines = _compile(UnrelatedCats(), _randn(2, 4, 3, 16), x, _randn(2, 4, 5, 8), _randn(2, 4, 5, 8),
                     *(_randn(2, 4, 5, 16) for _ in range(4)))
    assert not _unfused(lines, "norm_rope_gate"), lines


@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"])
def test_a_model_that_fuses_gets_no_new_line(name):
    model, inputs = build_model(name, dtype=torch.float32, seed=1)
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        compiled(*inputs)
    lines = [line for g in compiled.kunlun_backend.report.graphs for p in g.passes for line in p.near_misses]
    assert not [line for line in lines if "left unfused" in line], lines


def test_experts_after_a_graph_break_say_the_router_is_elsewhere():
    """tests/decode_stack.py's experts: `bincount` breaks the graph between the router and the expert GEMMs;
    the GEMMs' graph holds the sorted order and counts as inputs, and the near miss says so."""
    from . import decode_stack as ds
    model = ds.build(ds.CPU_CONFIG)
    inputs = ds.make_inputs(ds.CPU_CONFIG, 3, torch.Generator().manual_seed(2))
    compiled = kc.compile(model, strict=True)
    with torch.no_grad():
        assert rel_err(compiled(*inputs), model(*inputs)) < 1e-5
    lines = [m for g in compiled.kunlun_backend.report.graphs for p in g.passes for m in p.near_misses]
    moe = _unfused(lines, "moe_ffn")
    assert len(moe) == 2, lines  # the gate/up and the down GEMM
    assert all("the router's top-k / sort is not in this graph" in m for m in moe), moe


class ExpertsAfterAFusedOp(nn.Module):
    """The experts' half of a MoE whose router ran in an earlier graph (its sorted order and per-expert counts
    come in), fed by rotations that an earlier family fuses (a kunlun op upstream is not a router)."""

    def __init__(self, experts=4, hidden=64, inter=16, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.rotary = ChunkRotary()
        self.gate_up = nn.Parameter(torch.randn(experts, hidden, 2 * inter) / 8)
        self.down = nn.Parameter(torch.randn(experts, inter, hidden) / 4)

    def forward(self, q, k, cos, sin, order, counts):
        q, k = self.rotary(q, k, cos, sin)
        h = q.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[3])  # [B * S, H * D]
        rows = h[order // self.top_k]
        expert = torch.searchsorted(counts.cumsum(0), torch.arange(rows.shape[0]), right=True)
        gate, up = torch.bmm(rows.unsqueeze(1), self.gate_up[expert]).squeeze(1).chunk(2, dim=-1)
        out = torch.bmm((F.silu(gate) * up).unsqueeze(1), self.down[expert]).squeeze(1)
        return torch.zeros_like(h).index_add_(0, order // self.top_k, out), k


def test_experts_behind_a_fused_op_still_say_the_router_is_elsewhere():
    ids = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(1)).reshape(-1)
    order, counts = ids.argsort(stable=True), torch.bincount(ids, minlength=4)
    lines = _compile(ExpertsAfterAFusedOp().eval().requires_grad_(False), *_rope_args(), order, counts)
    assert _unfused(lines, "norm_rope_gate") == [], lines  # the rotations fused: a kunlun op before the experts
    moe = _unfused(lines, "moe_ffn")
    assert len(moe) == 2, lines
    assert all("the router's top-k / sort is not in this graph" in m for m in moe), moe
