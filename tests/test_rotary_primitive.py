"""The rotary primitive (`ops/rotary.py`, `passes/rules/rotary.py`): every spelling of a rotation becomes one
`kunlun::rotary` node, the prologue rules fuse chains of primitives, and what nothing fuses goes back as the
reference, bit for bit the model's arithmetic.

The attention prologues below are written here, independently of the rules: the rotation spelled with
`chunk`, with slices, as GPT-J pairs, written out without `-x2` against half-width tables, over part of the
head, in float32 on an upcast q -- with and without Q/K norms before or after the head transpose.  Each is
compiled with the backend and compared with eager (fp32: within 2e-6; bf16: exact where the op's
arithmetic is the model's, else as close to float64 as eager).
"""
import pytest
import torch
from torch import nn

import kunlun_compile as kc
from kunlun_compile.ops import rotary as rotary_op
from kunlun_compile.passes.fusion import FAMILY_STAGES
from kunlun_compile.passes.pattern_engine import apply_rewrites, trace_aten
from kunlun_compile.passes.rewrites import limit_rewrites
from kunlun_compile.passes.rules import norms, rotary as rules
from kunlun_compile.triton_kernel import cpu_kernels

from .conftest import rel_err

ROTARY = torch.ops.kunlun.rotary.default


# ---- the primitive's meaning ----------------------------------------------------------------------------

def _float64_rotation(x, cos, sin, neox, rotary_dim):
    """Independent of `ops/rotary.py`: angles applied pair by pair in float64."""
    x, cos, sin = x.double(), cos.double().expand(*x.shape[:-1], rotary_dim), sin.double().expand(*x.shape[:-1],
                                                                                                   rotary_dim)
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        out[..., a] = x[..., a] * cos[..., a] - x[..., b] * sin[..., a]
        out[..., b] = x[..., b] * cos[..., b] + x[..., a] * sin[..., b]
    return out


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_the_reference_rotates_pairs_by_their_angles(neox, rotary_dim):
    x = torch.randn(2, 3, 5, 16)
    angles = torch.randn(2, 1, 5, rotary_dim // 2)
    halves = torch.cat((angles, angles), -1) if neox else angles.repeat_interleave(2, -1)
    cos, sin = halves.cos(), halves.sin()
    got = torch.ops.kunlun.rotary(x, cos, sin, neox, rotary_dim)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert rel_err(got, _float64_rotation(x, cos, sin, neox, rotary_dim)) < 1e-6
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_a_float32_table_rotates_a_bf16_x_in_float32():
    x = torch.randn(2, 3, 5, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16)
    got = torch.ops.kunlun.rotary(x, cos, sin, True, 16)
    assert got.dtype == torch.float32
    assert torch.equal(got, x * cos + rotary_op.rotate(x, True) * sin)


@pytest.mark.parametrize("cos_shape, rotary_dim, message", [
    ((2, 1, 5, 8), 16, "tables of width 16"),
    ((2, 1, 5, 16), 7, "must be even"),
    ((2, 3, 5, 16, 1), 16, "tables of width 16"),
    ((2, 4, 5, 16), 16, "without growing it"),
])
def test_bad_tables_are_refused_with_a_clear_error(cos_shape, rotary_dim, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.kunlun.rotary(torch.randn(2, 3, 5, 16), torch.randn(*cos_shape), torch.randn(*cos_shape), True,
                                rotary_dim)


# ---- stage one: spellings -> primitives -> back ---------------------------------------------------------

def _chunk_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _slice_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pairs_rotate(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _written_out_halves(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _written_out_pairs(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _pairs_out_as_halves(x, cos, sin):
    """Pairs rotated, the results laid out even ones first, then odd ones (DeepSeek-V3's MLA layout)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


SPELLINGS = {  # name -> (rotation of one [B, H, S, D] tensor, tables width divisor)
    "chunk": (lambda x, c, s: x * c + _chunk_rotate_half(x) * s, 1),
    "slices": (lambda x, c, s: x * c + _slice_rotate_half(x) * s, 1),
    "pairs": (lambda x, c, s: x * c + _pairs_rotate(x) * s, 1),
    "written_out_halves": (_written_out_halves, 2),
    "written_out_pairs": (_written_out_pairs, 2),
    "pairs_out_as_halves": (_pairs_out_as_halves, 2),
    "partial_slices": (lambda x, c, s: torch.cat((x[..., :8] * c + _slice_rotate_half(x[..., :8]) * s, x[..., 8:]),
                                                 dim=-1), 2),
}


def _tables(dtype, width):
    return torch.randn(2, 1, 5, width, dtype=dtype), torch.randn(2, 1, 5, width, dtype=dtype)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_each_spelling_becomes_one_primitive_and_goes_back_bit_for_bit(name):
    rotate, divisor = SPELLINGS[name]
    x = torch.randn(2, 3, 5, 16)
    cos, sin = _tables(torch.float32, 16 // divisor)
    gm = trace_aten(rotate, (x, cos, sin))
    apply_rewrites(gm, rules.RECOGNISE, fuses=False)
    apply_rewrites(gm, rules.WIDEN, fuses=False)
    assert len(gm.graph.find_nodes(op="call_function", target=ROTARY)) == 1, gm.code
    assert torch.equal(gm(x, cos, sin), rotate(x, cos, sin).contiguous())  # the primitive's own result
    apply_rewrites(gm, rules.LOWER, fuses=False)
    assert not gm.graph.find_nodes(op="call_function", target=ROTARY)
    assert torch.equal(gm(x, cos, sin), rotate(x, cos, sin))


# ---- stage two: the prologue around the primitives ------------------------------------------------------

class Prologue(nn.Module):
    """q/k per-head views [B, S, H, D] -> (norm) -> transpose -> rotation; `norm` is "before" or "after" the
    transpose, or None; `upcast`: the rotation in float32, rounded back."""

    def __init__(self, spelling: str, norm=None, upcast=False, d=16):
        super().__init__()
        self.spelling = spelling
        self.rotate, divisor = SPELLINGS[spelling]
        self.width = d // divisor
        self.norm, self.upcast = norm, upcast
        self.q_weight, self.k_weight = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def _rms(self, x, w):
        dtype, x = x.dtype, x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(variance + 1e-6)).to(dtype)

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        out = []
        for x, w in ((q, self.q_weight), (k, self.k_weight)):
            x = self._rms(x, w) if self.norm == "before" else x
            x = x.transpose(1, 2)
            x = self._rms(x, w) if self.norm == "after" else x
            dtype = x.dtype
            x = self.rotate(x.float() if self.upcast else x, cos, sin)
            out.append(x.to(dtype))
        return tuple(out)


def _inputs(model, dtype):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    cos, sin = torch.randn(2, 5, model.width, generator=g), torch.randn(2, 5, model.width, generator=g)
    return tuple(t.to(dtype) for t in (q, k, cos, sin))


def _compile(model, inputs, **options):
    compiled = kc.compile(model, strict=True, **options)
    with torch.no_grad():
        got, want = compiled(*inputs), model(*inputs)
    report = compiled.kunlun_backend.report
    return got, want, report.graphs[0].patterns["norm_rope_gate"], [
        line for g in report.graphs for p in g.passes for line in p.near_misses]


@pytest.mark.parametrize("spelling, norm", [
    ("chunk", None), ("slices", "before"), ("pairs", "after"), ("written_out_halves", "before"),
    ("written_out_pairs", None), ("partial_slices", "after"), ("pairs_out_as_halves", "before"),
])
def test_independent_prologues_fuse_into_one_op_per_layer_in_fp32(spelling, norm):
    model = Prologue(spelling, norm).eval()
    got, want, fused, misses = _compile(model, _inputs(model, torch.float32))
    assert fused == 1, misses  # q and k in one op
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-6


def _float64(model, inputs):
    ref = type(model)(model.spelling, model.norm, model.upcast).double().to(inputs[0].device).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        return ref(*(t.double() if t.is_floating_point() else t for t in inputs))


@pytest.mark.parametrize("spelling, norm, upcast", [
    ("chunk", None, False), ("pairs", None, True), ("written_out_halves", "after", False),
    ("partial_slices", "before", False), ("written_out_pairs", "after", False), ("pairs_out_as_halves", None, False),
])
def test_independent_prologues_fuse_in_bf16(spelling, norm, upcast):
    """Against float64: as close as eager (bf16 with a norm: the op normalises in float32 and rounds once where
    the model rounds twice); without a norm the op's arithmetic is the model's, so the bits are eager's."""
    model = Prologue(spelling, norm, upcast).to(torch.bfloat16).eval()
    inputs = _inputs(model, torch.bfloat16)
    with cpu_kernels(False):  # the op's reference (the interpreter's bf16 rounding is biased: tests/op_helpers.py)
        got, want, fused, misses = _compile(model, inputs)
    assert fused == 1, misses
    for g, w, e in zip(got, want, _float64(model, inputs)):
        assert torch.equal(g, w) if norm is None else rel_err(g, e) <= max(1e-2, 1.25 * rel_err(w, e))


def test_gptj_tables_fuse_under_dynamic_shapes():
    """A replacement traced under dynamic shapes reads sizes off the tables it built (`sym_size` of an
    `unsqueeze`): canonicalisation reads them off the graph's inputs, or the prologue rule sees the table
    escape its match (deepseek-v3-tiny's GPT-J rotary was left unfused on the GPU, dynamic=True)."""
    from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs
    model, _ = build_model("deepseek-v3-tiny", num_tokens=6, seed=5)
    compiled = kc.compile(model, dynamic=True, strict=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in (6, 3):
            ids, pos = make_inputs(BUILTIN_CONFIGS["deepseek-v3-tiny"], t, generator=gen)
            assert rel_err(compiled(ids, pos), model(ids, pos)) < 1e-5
    assert compiled.kunlun_backend.report.graphs[0].patterns["norm_rope_gate"] == 2


class LoneRotation(nn.Module):
    """One tensor rotated (no k beside it: no prologue rule takes it), then viewed as [B * H, S, D] -- a view
    valid only because the written-out spelling's `cat` is contiguous, as the reference put back must be."""

    def __init__(self, spelling):
        super().__init__()
        self.rotate = SPELLINGS[spelling][0]

    def forward(self, q, cos, sin):
        b, s, h, d = q.shape
        out = self.rotate(q.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
        return out.view(b * h, s, d) * 2


@pytest.mark.parametrize("spelling", ["written_out_halves", "written_out_pairs"])
def test_a_primitive_nothing_fused_goes_back_with_its_layout_and_a_reason(spelling):
    width = 16 // SPELLINGS[spelling][1]
    model = LoneRotation(spelling)
    inputs = (torch.randn(2, 5, 4, 16), torch.randn(2, 5, width), torch.randn(2, 5, width))
    got, want, fused, misses = _compile(model, inputs)
    assert fused == 0
    assert torch.equal(got, want)
    lines = [line for line in misses if line.startswith("norm_rope_gate: ") and "left unfused" in line]
    assert len(lines) == 1 and "rotary rotation, " in lines[0] and "of float32 [2, 4, 5, 16]" in lines[0], lines


class ReplayedViews(nn.Module):
    """HF Glm's partial pairs rotary as vLLM's transformers backend traces it: each use of q and k re-creates
    its `view -> transpose -> slice` chain (functionalization replays the views of the buffer the projection
    wrote), so one rotation reads x through two equal chains."""

    def forward(self, q_flat, k_flat, cos, sin):
        def heads(t, n):
            return t.view(1, t.shape[1], n, 32).transpose(1, 2)

        def rotate(t_a, t_b):
            r_a, r_b = t_a[..., :16], t_b[..., :16]
            rot = torch.stack((-r_b[..., 1::2], r_b[..., ::2]), dim=-1).flatten(-2)
            return torch.cat((r_a * cos + rot * sin, t_b[..., 16:]), dim=-1)

        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return rotate(heads(q_flat, 4), heads(q_flat, 4)), rotate(heads(k_flat, 2), heads(k_flat, 2))


def test_replayed_view_chains_fuse_as_one_prologue():
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 5, 128, generator=g), torch.randn(1, 5, 64, generator=g),
              torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g))
    with cpu_kernels(False):
        got, want, fused, misses = _compile(ReplayedViews().eval(), inputs)
    assert fused == 1, misses
    for g_, w in zip(got, want):
        assert torch.equal(g_, w)


def test_primitive_rewrites_are_not_counted_by_a_bisect():
    """`kunlun-compile bisect` limits a pass's fusions; making and lowering primitives are not fusions."""
    model = Prologue("chunk", "before").eval()
    inputs = _inputs(model, torch.float32)
    with limit_rewrites("norm_rope_gate", 0) as log:
        got, want, fused, _ = _compile(model, inputs)
    assert fused == 0 and log.made == [] and log.refused >= 1
    for g, w in zip(got, want):
        assert rel_err(g, w) < 2e-6


def test_the_prologue_family_runs_its_stages_in_order():
    """Norms, then rotations, become primitives; the fusing rules take them; the rotations left go back (and
    the norms, where the norm family that fuses them is off)."""
    stages = FAMILY_STAGES["norm_rope_gate"]
    assert [s.fuses for s in stages] == [False, False, False, True, True, False, False]
    assert stages[0].rules is norms.RECOGNISE and stages[0].quiet and stages[1].rules is rules.RECOGNISE
    assert stages[-2].rules is rules.LOWER and stages[-1].rules is norms.LOWER and stages[-1].when is not None


@pytest.mark.gpu
@pytest.mark.parametrize("spelling, norm, upcast", [
    ("chunk", "before", False), ("pairs", None, True), ("written_out_halves", "after", False),
    ("written_out_pairs", None, False), ("partial_slices", "after", False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_independent_prologues_on_cuda(spelling, norm, upcast, dtype):
    """The fused op's Triton kernel on the GPU, against float64: as close as eager, one op per layer."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = Prologue(spelling, norm, upcast).to(device="cuda", dtype=dtype).eval()
    inputs = tuple(t.cuda() for t in _inputs(model, dtype))
    got, want, fused, misses = _compile(model, inputs)
    assert fused == 1, misses
    for g, w, e in zip(got, want, _float64(model, inputs)):
        assert rel_err(g, e) <= max(1e-5 if dtype == torch.float32 else 1e-2, 1.25 * rel_err(w, e))


def test_patterns_are_traced_hermetically_inside_a_running_compile():
    """vLLM runs the passes inside inductor, whose tracing context holds Dynamo's fake mode: a pattern traced
    there took symbols of that shape environment for its example sizes and left guards on them (a rotation's
    `x.shape[-1] // 2`, a `chunk`), which Dynamo cannot source ("list index out of range" building guards;
    every vLLM run with the post-grad pass failed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from kunlun_compile.passes.pattern_engine import trace_pattern

    env = ShapeEnv()
    with torch._guards.tracing(torch._guards.TracingContext(FakeTensorMode(shape_env=env))):
        gm = trace_pattern(SPELLINGS["slices"][0], (torch.randn(2, 3, 5, 16),) + _tables(torch.float32, 16))
    assert not env.guards
    assert all(isinstance(d, int) for n in gm.graph.nodes if "val" in n.meta for d in n.meta["val"].shape)
