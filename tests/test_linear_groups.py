"""The decode_linear rule and the group_linears pass on small modules: what becomes kunlun::linear /
linear_group, what is left alone and why, and the outputs."""
import torch
from torch import nn

import kunlun_compile as kc


class SharedInputBlock(nn.Module):
    """Qwen3-Next's MoE block shape: router, shared gate|up and shared gate read one hidden state; a
    linear with a bias beside them; a projection of another input."""

    def __init__(self, h=32):
        super().__init__()
        self.router = nn.Linear(h, 8, bias=False)
        self.gate_up = nn.Linear(h, 48, bias=False)
        self.gate = nn.Linear(h, 1, bias=False)
        self.biased = nn.Linear(h, 16)
        self.down = nn.Linear(24, h, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        shared = self.down(torch.nn.functional.silu(g) * u) * torch.sigmoid(self.gate(x))
        return self.router(x).softmax(-1), shared, self.biased(x)


def _ops(report):
    return [p for p in report.graphs[0].passes if p.name in ("decode_linear", "group_linears")]


def test_siblings_of_one_input_share_one_launch():
    m = SharedInputBlock().eval().requires_grad_(False)
    x = torch.randn(1, 32)
    compiled = kc.compile(m, strict=True)
    with torch.no_grad():
        got, want = compiled(x), m(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    decode, group = _ops(compiled.kunlun_backend.report)
    assert decode.matches == 5  # one row: every linear is a GEMV
    assert group.matches == 1  # router, gate_up and gate; the biased one and `down` (other input) stay alone
    # kernels: the group, the biased linear, `down` with the SwiGLU inside (the gate multiply is generated)
    assert compiled.kunlun_backend.report.graphs[0].kernels["fused"] == 3


def test_static_rows_where_cublas_runs_are_left_alone_with_a_reason():
    m = SharedInputBlock().eval().requires_grad_(False)
    x = torch.randn(8, 32)  # 8 rows: only outputs of <= 64 columns take the GEMV -- here all of them
    compiled = kc.compile(m, strict=True)
    with torch.no_grad():
        compiled(x)
    decode, _ = _ops(compiled.kunlun_backend.report)
    assert decode.matches == 5
    x = torch.randn(40, 32)  # 40 rows: cuBLAS for every linear, so no rewrite
    compiled = kc.compile(m, strict=True, dynamic=False)  # (a second shape would make dynamo go dynamic)
    with torch.no_grad():
        got, want = compiled(x), m(x)
    decode, group = _ops(compiled.kunlun_backend.report)
    assert decode.matches == 0 and group.matches == 0
    assert any("static 40 rows" in line and "cuBLAS is the kernel" in line for line in decode.near_misses)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dynamic_rows_keep_the_rewrite_and_every_size_is_right():
    m = SharedInputBlock().eval().requires_grad_(False)
    compiled = kc.compile(m, strict=True, dynamic=True)
    with torch.no_grad():
        for rows in (1, 3, 20, 70):
            x = torch.randn(rows, 32)
            for a, b in zip(compiled(x), m(x)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    decode, group = _ops(compiled.kunlun_backend.report)
    assert decode.matches == 5 and group.matches == 1


class LateWeight(nn.Module):
    """The second sibling's weight is computed after the first linear: grouping would use it too early."""

    def __init__(self, h=32):
        super().__init__()
        self.a = nn.Linear(h, 8, bias=False)
        self.w = nn.Parameter(torch.randn(8, h))

    def forward(self, x):
        first = self.a(x)
        return first, torch.nn.functional.linear(x, self.w * 2.0)


def test_sibling_whose_weight_comes_later_is_left_alone():
    m = LateWeight().eval().requires_grad_(False)
    compiled = kc.compile(m, strict=True, dynamic=True)  # strict: a misplaced node would raise
    x = torch.randn(1, 32)
    with torch.no_grad():
        for a, b in zip(compiled(x), m(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    decode, group = _ops(compiled.kunlun_backend.report)
    assert decode.matches == 2 and group.matches == 0
