"""Views downstream of fused ops: a fused op's contiguous result must not break a `view` the graph was
traced with under another layout (the Q/K norm after the head transpose, then attention, then `view`)."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import kunlun_compile as kc
from kunlun_compile.passes.layouts import views_after_fused_ops

from .conftest import STRICT, rel_err

aten = torch.ops.aten


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class NormAfterTranspose(nn.Module):
    """q (with its gate beside it), k and v split out of one projection into heads, transposed to
    [B, H, S, D] and then RMS-normed: the norm sees a non-contiguous input, and eager's result keeps
    that layout where the fused norm's is contiguous.  Attention, transposed back, flattened with
    `reshape` (which the trace decides to be a `view`), gated."""

    def __init__(self, hidden=48, heads=6, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.proj = nn.Linear(hidden, 4 * heads * head_dim, bias=False)
        self.q_w, self.k_w = nn.Parameter(torch.rand(head_dim) + 0.5), nn.Parameter(torch.rand(head_dim) + 0.5)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        n = self.heads * self.head_dim
        q_gate, k, v = self.proj(x).split([2 * n, n, n], dim=-1)
        q, gate = q_gate.view(b, s, self.heads, 2 * self.head_dim).split(self.head_dim, dim=-1)
        q = rms(q.transpose(1, 2), self.q_w)
        k = rms(k.view(b, s, self.heads, self.head_dim).transpose(1, 2), self.k_w)
        v = v.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(1, 2).reshape(b, s, -1)
        return self.o(attn * torch.sigmoid(gate.reshape(b, s, -1)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_norm_after_transpose_matches_eager(dynamic):
    torch.manual_seed(0)
    model = NormAfterTranspose().eval()
    compiled = kc.compile(model, dynamic=dynamic, graph_mode="none", **STRICT)
    with torch.no_grad():
        for b, s in [(2, 5), (3, 4), (1, 7)]:
            x = torch.randn(b, s, 48)
            got, want = compiled(x), model(x)
            assert rel_err(got, want) < 1e-5
    report = compiled.kunlun_backend.report
    assert sum(g.kernels["fused"] for g in report.graphs) > 0, "nothing fused: no fused op's layout to test"


def test_without_the_pass_the_traced_view_fails():
    """The model above does reach the fault: the same graph without the pass cannot run its view."""
    torch.manual_seed(0)
    model = NormAfterTranspose().eval()
    compiled = kc.compile(model, graph_mode="none", disable=("views_after_fused_ops",), **STRICT)
    with torch.no_grad(), pytest.raises(RuntimeError, match="view size is not compatible"):
        compiled(torch.randn(2, 5, 48))


def _graph():
    """x -> kunlun::rms_norm -> transpose -> view, and a view straight of the norm."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    normed = g.call_function(torch.ops.kunlun.rms_norm.default, (x, w, 1e-6, 0.0))
    flat = g.call_function(aten.view.default, (normed, [-1, 8]))
    moved = g.call_function(aten.transpose.int, (normed, 1, 2))
    merged = g.call_function(aten.view.default, (moved, [2, -1]))
    pair = g.call_function(torch.ops.kunlun.fused_add_rmsnorm.default, (x, x, w, 1e-6, 0.0))
    first = g.call_function(operator.getitem, (pair, 0))
    of_first = g.call_function(aten.view.default, (first, [-1, 8]))
    of_input = g.call_function(aten.view.default, (x, [-1, 8]))
    g.output((flat, merged, of_first, of_input))
    return fx.GraphModule(nn.Module(), g)


def test_only_views_behind_other_ops_become_reshapes():
    gm = _graph()
    views_after_fused_ops(gm, None)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    # a view of a fused result, of its getitem, and of an input stay views; the view behind the transpose does not
    assert targets.count(aten.reshape.default) == 1
    merged = [n for n in gm.graph.nodes if n.target is aten.reshape.default][0]
    assert merged.args[0].target is aten.transpose.int
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    flat, merged_out, _, _ = gm(x, w)  # the transposed result is not viewable: the reshape copies
    ref = torch.ops.kunlun.rms_norm(x, w, 1e-6, 0.0)
    assert torch.equal(merged_out, ref.transpose(1, 2).reshape(2, -1))


# without the pass, the generic lowering is off too: it would read the view in place (an indexed load)
@pytest.mark.parametrize("disable", [("norm_rope_gate",),
                                     ("norm_rope_gate", "views_after_fused_ops", "lower_elementwise")],
                         ids=["with-pass", "without-pass"])
def test_hf_gemma3_norms_after_the_head_transpose(disable):
    """HF transformers' Gemma3 applies its Q/K norms after the head transpose (one of the architectures
    that fell back to eager for the whole graph on the Triton path).  The prologue rule now takes those
    norms with the rotary; with it off they become lone norms of the transposed heads, the case the pass is
    for: exact with the pass, and the same graph without it cannot run its view."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=128, sliding_window=32)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    compiled = torch.compile(model, backend=kc.backend(graph_mode="none", disable=disable, **STRICT))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        if "views_after_fused_ops" in disable:
            with pytest.raises(RuntimeError, match="view size is not compatible"):
                compiled(ids)
        else:
            assert rel_err(compiled(ids).logits, want) < 1e-5
