"""The decode_linear family's gated forms on small modules: SwiGLU before a down projection, an attention
output gate before o_proj, Qwen3-Next's gated shared expert added to the routed output -> one
kunlun::gated_linear each; a broadcast gate is left to the element-wise lowering with a reason."""
import torch
from torch import nn
from torch.nn import functional as F

import kunlun_compile as kc


class GatedBlock(nn.Module):
    def __init__(self, h=32, i=24, heads=48):
        super().__init__()
        self.gate_up = nn.Linear(h, 2 * i, bias=False)
        self.down = nn.Linear(i, h, bias=False)
        self.qg = nn.Linear(h, 2 * heads, bias=False)
        self.o = nn.Linear(heads, h, bias=False)
        self.shared_gate = nn.Linear(h, 1, bias=False)

    def forward(self, x, routed):
        gu = self.gate_up(x)
        d = gu.shape[-1] // 2
        shared = self.down(F.silu(gu[:, :d]) * gu[:, d:])  # SwiGLU -> down, gated residual on top
        out = routed + torch.sigmoid(self.shared_gate(x)) * shared
        attn, gate = self.qg(x).chunk(2, dim=-1)
        return out, self.o(attn * torch.sigmoid(gate))  # attention output gate -> o_proj


def _run(m, *inputs, **options):
    compiled = kc.compile(m, strict=True, report=True, **options)
    with torch.no_grad():
        got, want = compiled(*inputs), m(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return compiled.kunlun_backend.report.graphs[0]


def test_gated_forms_become_gated_linears():
    m = GatedBlock().eval().requires_grad_(False)
    g = _run(m, torch.randn(1, 32), torch.randn(1, 32))
    (code,) = [p.code_after for p in g.passes if p.name == "decode_linear"]
    assert code.count("kunlun.gated_linear") == 2, code
    # the shared expert's down projection takes the row gate and the routed output; o_proj the sigmoid gate
    assert "'silu', " in code and "'sigmoid')" in code
    # left as generated kernels: none (the product and the residual are inside the GEMVs)
    assert g.kernels["pointwise"] == 0


def test_every_row_count_from_one_dynamic_graph():
    m = GatedBlock().eval().requires_grad_(False)
    compiled = kc.compile(m, strict=True, dynamic=True)
    with torch.no_grad():
        for rows in (1, 3, 40):  # GEMV, GEMV (narrow outputs), cuBLAS with the product/epilogue kernels
            x, routed = torch.randn(rows, 32), torch.randn(rows, 32)
            for a, b in zip(compiled(x, routed), m(x, routed)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (g,) = compiled.kunlun_backend.report.graphs
    assert g.patterns["decode_linear"] == 5  # gate_up, qg, shared_gate plain; down, o gated


class PlainSharedExpert(nn.Module):
    """DeepSeek's form: the shared expert added to the routed output with no gate of its own."""

    def __init__(self, h=32, i=24):
        super().__init__()
        self.gate_up = nn.Linear(h, 2 * i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x, routed):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return (routed + self.down(F.silu(g) * u),)


def test_plain_shared_expert_takes_the_residual_into_the_gemv():
    m = PlainSharedExpert().eval().requires_grad_(False)
    g = _run(m, torch.randn(1, 32), torch.randn(1, 32))
    (code,) = [p.code_after for p in g.passes if p.name == "decode_linear"]
    assert code.count("kunlun.gated_linear") == 1 and "'silu', None, " in code, code
    assert g.kernels["pointwise"] == 0


class BroadcastGate(nn.Module):
    def __init__(self, h=32):
        super().__init__()
        self.proj = nn.Linear(h, h, bias=False)
        self.g = nn.Linear(h, 1, bias=False)

    def forward(self, x):
        return self.proj(x * torch.sigmoid(self.g(x)))  # one gate value per row: not the prologue's form


def test_broadcast_gate_is_refused_with_a_reason():
    m = BroadcastGate().eval().requires_grad_(False)
    g = _run(m, torch.randn(1, 32))
    (decode,) = [p for p in g.passes if p.name == "decode_linear"]
    assert any("broadcast gate" in line for line in decode.near_misses), decode.near_misses
    assert decode.matches == 2  # both linears plain


class BroadcastResiduals(nn.Module):
    """A residual that is a bias vector and a gate with one value per element: neither is the epilogue's
    form, so the residual rules refuse and the SwiGLU still goes into the down projection."""

    def __init__(self, h=32, i=24):
        super().__init__()
        self.gate_up = nn.Linear(h, 2 * i, bias=False)
        self.down = nn.Linear(i, h, bias=False)
        self.down2 = nn.Linear(i, h, bias=False)
        self.shift = nn.Parameter(torch.randn(h))

    def forward(self, x, t):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        a = self.shift + self.down(F.silu(g) * u)
        b = x + torch.sigmoid(t) * self.down2(F.silu(u) * g)
        return a, b


def test_broadcast_residuals_are_refused_and_the_prologue_still_fuses():
    m = BroadcastResiduals().eval().requires_grad_(False)
    g = _run(m, torch.randn(1, 32), torch.randn(1, 32))
    (decode,) = [p for p in g.passes if p.name == "decode_linear"]
    assert any("addend (32,) is not the output's shape" in line for line in decode.near_misses), decode.near_misses
    assert any("is not one value per row" in line for line in decode.near_misses), decode.near_misses
    assert decode.code_after.count("kunlun.gated_linear") == 2 and "'silu', None, " not in decode.code_after


def test_explain_shows_the_gated_linears_kernel_by_size():
    """`kunlun-compile explain`'s linear table: a gated linear is its own row, with its own plan."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from kunlun_compile.debug.explain import linear_paths

    def step(x, gate, w, w2):
        return torch.ops.kunlun.gated_linear(x, gate, w, "silu"), torch.ops.kunlun.linear(x, w2)

    gm = make_fx(step)(torch.randn(1, 768), torch.randn(1, 768), torch.randn(2048, 768), torch.randn(2048, 768))
    rows = {r["gated"]: r for r in linear_paths(gm, [1, 2, 4, 8])}
    assert rows[True]["out_features"] == [2048] and rows[False]["out_features"] == [2048]
    assert rows[True]["plans"][1] == ("GEMV, 2 column(s) per program, K tile 1024, 4 warps, "
                                      "gated product in the prologue")
    assert rows[False]["plans"][1] == "GEMV, 2 column(s) per program, K tile 1024, 2 warps"
    assert rows[True]["plans"][4].startswith("F.linear (cuBLAS), with product / epilogue kernels")
