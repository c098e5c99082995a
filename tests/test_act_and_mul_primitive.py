"""Activation-and-multiply in any spelling (`activations.py`): SwiGLU as HF writes it, commuted, with silu
written out (sigmoid first or last), from a chunked or sliced gate_up projection, the projections spelled
`x @ w.T`; an attention output gate either way round.  Each becomes one `kunlun::gated_linear` with the
projection it feeds; GeGLU (the kernel has no gelu) goes back as the model's own arithmetic with a near miss.
Compared with eager and with a float64 copy, in float32 and bfloat16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kunlun_compile as kc
from kunlun_compile.passes.pattern_engine import apply_rewrites, trace_aten
from kunlun_compile.passes.rules import activations
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import rel_err

H, I = 32, 48


SPELLINGS = {
    "hf": lambda g, u: F.silu(g) * u,
    "commuted": lambda g, u: u * F.silu(g),
    "written_out": lambda g, u: g * torch.sigmoid(g) * u,
    "written_out_commuted": lambda g, u: u * (g * torch.sigmoid(g)),
    "sigmoid_first": lambda g, u: torch.sigmoid(g) * g * u,
}
WRITTEN_OUT = {"written_out", "written_out_commuted", "sigmoid_first"}


class Mlp(nn.Module):
    """gate and up as two projections, as one `gate_up` cut by chunk or by slices, or `x @ w.T`."""

    def __init__(self, product, layout: str, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.product, self.layout = product, layout
        self.w_gate = nn.Parameter((torch.randn(I, H, generator=gen) / 6).to(dtype))
        self.w_up = nn.Parameter((torch.randn(I, H, generator=gen) / 6).to(dtype))
        self.w_down = nn.Parameter((torch.randn(H, I, generator=gen) / 7).to(dtype))

    def forward(self, x):
        if self.layout == "matmul":
            return self.product(x @ self.w_gate.T, x @ self.w_up.T) @ self.w_down.T
        if self.layout == "separate":
            g, u = F.linear(x, self.w_gate), F.linear(x, self.w_up)
        else:
            gu = F.linear(x, torch.cat([self.w_gate, self.w_up]))
            g, u = gu.chunk(2, dim=-1) if self.layout == "chunk" else (gu[..., :I], gu[..., I:])
        return F.linear(self.product(g, u), self.w_down)


def _compile_and_run(model, x, interpreted=False):
    torch._dynamo.reset()
    compiled = kc.compile(model, strict=True)
    with torch.no_grad(), cpu_kernels(interpreted):
        got, want = compiled(x), model(x)
    graph = compiled.kunlun_backend.report.graphs[0]
    (code,) = [p.code_after for p in graph.passes if p.name == "decode_linear"]
    misses = [m for p in graph.passes for m in p.near_misses]
    return got, want, code, misses


def _run_module(module, *inputs):
    """(compiled result, eager result, the compiled graph's report)."""
    torch._dynamo.reset()
    compiled = kc.compile(module, strict=True)
    with torch.no_grad():
        got, want = compiled(*inputs), module(*inputs)
    return got, want, compiled.kunlun_backend.report.graphs[0]


def _forward64(model, x):
    m64 = Mlp(model.product, model.layout, torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return m64(x.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["separate", "chunk", "slices", "matmul"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_is_one_gated_linear(spelling, layout, dtype):
    model = Mlp(SPELLINGS[spelling], layout, dtype).eval()
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    got, want, code, misses = _compile_and_run(model, x)
    assert code.count("kunlun.gated_linear") == 1 and "'silu'" in code, (code, misses)
    assert "act_and_mul" not in code
    if spelling not in WRITTEN_OUT:  # the kernel's silu is F.silu: eager's bits
        assert torch.equal(got, want)
    # silu written out rounds after the sigmoid and the product; the kernel does not: within bf16's step
    assert rel_err(got, _forward64(model, x)) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("interpreted", [False, True], ids=["reference", "interpreted"])
def test_commuted_swiglu_through_the_gemv_kernel(interpreted):
    if interpreted and not kc.ops.interpreter_usable():
        pytest.skip("needs the Triton interpreter")
    # float32: the interpreter truncates where a GPU rounds to bf16, three times over in this block
    model = Mlp(SPELLINGS["commuted"], "chunk").eval()
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(4))
    got, want, code, _ = _compile_and_run(model, x, interpreted)
    assert "kunlun.gated_linear" in code
    assert rel_err(got, _forward64(model, x)) < 1e-6 and rel_err(got, want) < 1e-6


class OutputGate(nn.Module):
    def __init__(self, sigmoid_first: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.sigmoid_first = sigmoid_first
        self.qg = nn.Parameter(torch.randn(2 * I, H, generator=gen) / 6)
        self.o = nn.Parameter(torch.randn(H, I, generator=gen) / 7)

    def forward(self, x):
        attn, gate = F.linear(x, self.qg).chunk(2, dim=-1)
        gated = torch.sigmoid(gate) * attn if self.sigmoid_first else attn * torch.sigmoid(gate)
        return F.linear(gated, self.o)


@pytest.mark.parametrize("sigmoid_first", [False, True])
def test_an_attention_output_gate_either_way_round(sigmoid_first):
    model = OutputGate(sigmoid_first).eval()
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(6))
    got, want, code, misses = _compile_and_run(model, x)
    assert code.count("kunlun.gated_linear") == 1 and "'sigmoid'" in code, (code, misses)
    assert torch.equal(got, want)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_geglu_goes_back_as_written_with_a_near_miss(approximate, dtype):
    """The kernel has no gelu: the product goes back as the model's arithmetic (to the bit), the two
    projections are plain linears, and the miss says why.  Both projections come out of one cached trace of
    the linear rule with one shared value object: the put-back must still read gate and up, not one twice
    (it read one twice once: `pattern_engine._distinct`)."""
    model = Mlp(lambda g, u: F.gelu(g, approximate=approximate) * u, "separate", dtype).eval()
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(8)).to(dtype)
    got, want, code, misses = _compile_and_run(model, x)
    assert "gated_linear" not in code and "act_and_mul" not in code
    assert "aten.gelu" in code and "aten.mul" in code  # as written; the element-wise lowering takes it next
    # its generated kernel computes gelu in float32 as eager does, to a few ulps of eager's library functions
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 4e-3)
    assert rel_err(got, _forward64(model, x)) < (1e-6 if dtype == torch.float32 else 8e-3)
    activation = "gelu_tanh" if approximate == "tanh" else "gelu"
    assert any(f"{activation}(gate) * x: kunlun::gated_linear's activations are silu and sigmoid" in m
               for m in misses), misses


def test_a_product_that_feeds_no_linear_goes_back_without_a_near_miss():
    class Lone(nn.Module):
        def forward(self, g, u):
            return u * F.silu(g) + torch.sigmoid(g) * u

    got, want, graph = _run_module(Lone(), torch.randn(3, 8), torch.randn(3, 8))
    assert rel_err(got, want) < 1e-6
    (code,) = [p.code_after for p in graph.passes if p.name == "decode_linear"]
    assert "act_and_mul" not in code and "aten.silu" in code and "aten.sigmoid" in code
    assert not [m for p in graph.passes for m in p.near_misses if "act_and_mul" in m or "gelu" in m]


def test_a_replacement_keeps_two_inputs_that_share_one_value_object_apart():
    """Two nodes holding one fake tensor object (as nodes inserted from one cached trace do) are two inputs."""
    gm = trace_aten(lambda a, b: torch.ops.kunlun.act_and_mul(a + 1, b * 2, "gelu"),
                    (torch.randn(3, 8), torch.randn(3, 8)))
    add, mul = (n for n in gm.graph.nodes if n.target in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor))
    mul.meta["val"] = add.meta["val"]  # shared, as after two insertions of one cached replacement
    apply_rewrites(gm, activations.LOWER, fuses=False)
    gm.recompile()
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(gm(a, b), F.gelu(a + 1) * (b * 2))


@pytest.mark.gpu
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_on_cuda(spelling):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = Mlp(SPELLINGS[spelling], "chunk", torch.bfloat16).eval().cuda()
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).cuda()
    got, want, code, misses = _compile_and_run(model, x)
    assert "kunlun.gated_linear" in code, misses
    assert rel_err(got.cpu(), _forward64(model.cpu(), x.cpu())) < 8e-3


def test_a_number_times_an_activation_is_not_a_product_of_tensors():
    """`sigmoid(x) * 2.0` has the shape of `sigmoid(g) * up`: the pattern's `up` binds the number.  It used to
    crash the pass (a guard read the number's metadata); the engine refuses it, saying so."""
    class Scaled(nn.Module):
        def forward(self, x, w):
            return F.linear(torch.sigmoid(x) * 2.0, w) + F.linear(3.0 * F.silu(x), w)

    got, want, graph = _run_module(Scaled(), torch.randn(1, 8), torch.randn(4, 8))
    assert rel_err(got, want) < 1e-6
    misses = [m for p in graph.passes for m in p.near_misses]
    assert any("is the number 2.0, not a tensor" in m for m in misses), misses
    assert graph.patterns["decode_linear"] == 2  # the two projections, as plain linears
