"""The kunlun:: ops' Triton kernels on hostile inputs: every tensor input as a non-contiguous view (as a
graph can hand it: a slice of a fused projection, a row of a wider buffer, a strided index vector), and
index inputs out of range.

A kernel must read the values a view shows (its strides, its storage offset) and never read outside its
tensors: an out-of-range position or expert id reads nothing and makes its rows NaN; the op wrapper
raises IndexError as eager does where it checks on the host (CPU tensors; CUDA with
KUNLUN_COMPILE_CHECK_INDICES=1).  Results are compared with each op's reference on contiguous copies
of the same (seeded random) values, by relative error; integer results exactly.
"""
import dataclasses
import math
import os
import subprocess
import sys
from typing import Callable, Dict

import pytest
import torch

import kunlun_compile  # noqa: F401 - registers torch.ops.kunlun
from kunlun_compile.models.layers import RotaryEmbedding
from kunlun_compile.ops import (add_rmsnorm, attention_mask, cpu_kernels, fused_moe, gated_linear, linear,
                                masked_input, moe_gate, norm_rope_gate, qk_norm_rope)
from kunlun_compile.ops.index_checks import check_indices
from kunlun_compile.ops.moe_plan import MoePlan

from .conftest import rel_err
from .op_helpers import needs_interpreter, seeded

kunlun = torch.ops.kunlun
TOL = 1e-5  # fp32 throughout: the kernels differ from the references only in summation order


# ---- views a graph can hand an op ------------------------------------------------------------------

def every_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, every dim at stride >= 2 and a storage offset (nothing is unit-stride)."""
    buffer = torch.full([2 * s + 1 for s in t.shape], 7, dtype=t.dtype, device=t.device)
    view = buffer[tuple(slice(1, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def row_padded(t: torch.Tensor) -> torch.Tensor:
    """The same values with unit inner stride but wider rows and a storage offset (a slice of a wider
    buffer, e.g. q out of a fused qkv row)."""
    buffer = torch.full([s + 3 for s in t.shape], 7, dtype=t.dtype, device=t.device)
    view = buffer[tuple(slice(2, 2 + s) for s in t.shape)]
    view.copy_(t)
    return view


VIEWS = {"strided": every_dim_strided, "row_padded": row_padded}


def assert_same(got, want, tol=TOL):
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if not g.is_floating_point():
            assert torch.equal(g, w)
        elif w.numel():
            assert rel_err(g, w) < tol


# ---- every op, every tensor input as a view ---------------------------------------------------------

@dataclasses.dataclass
class OpCase:
    op: Callable
    reference: Callable
    make: Callable[[torch.Generator], tuple]  # the op's arguments, fresh seeded random values
    tensors: Dict[str, int]  # each tensor argument's name -> its position in the arguments


def first(*names: str) -> Dict[str, int]:
    """Tensor arguments that come first, in this order."""
    return {n: i for i, n in enumerate(names)}


def _qkv_case(nq, nkv, D, rot, has_gate, neox, norm):
    def make(gen):
        qkv = torch.randn(6, norm_rope_gate.qkv_columns(nq, nkv, D, has_gate), generator=gen)
        qw = 1 + 0.3 * torch.randn(D, generator=gen) if norm else None
        kw = 1 + 0.3 * torch.randn(D, generator=gen) if norm else None
        angles = torch.rand(40, rot // 2, generator=gen) * 2 * math.pi
        cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
        pos = torch.randint(0, 40, (6,), generator=gen)
        offset = 1.0 if norm == "gemma" else 0.0
        return (qkv, qw, kw, cache, pos, nq, nkv, D, rot, 1e-6, offset, has_gate, neox)
    tensors = first("qkv", "q_weight", "k_weight", "cos_sin_cache", "positions")
    if not norm:  # the weights are None
        del tensors["q_weight"], tensors["k_weight"]
    return OpCase(kunlun.split_norm_rope_gate, norm_rope_gate.reference, make, tensors)


def _moe_args(M, E, H, I, k, gen):
    x = torch.randn(M, H, generator=gen)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).to(torch.int32)
    return x, w13, w2, torch.rand(M, k, generator=gen) + 0.1, ids


OP_CASES = {
    "split_norm_rope_gate-llama": _qkv_case(4, 2, 16, 16, False, True, None),
    "split_norm_rope_gate-qwen3next": _qkv_case(2, 1, 32, 8, True, True, "gemma"),
    "qk_norm_rope": OpCase(
        kunlun.qk_norm_rope, qk_norm_rope.reference,
        lambda g: (torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g),
                   1 + 0.3 * torch.randn(16, generator=g), 1 + 0.3 * torch.randn(16, generator=g),
                   torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), 1e-6, 0.0, True),
        first("q", "k", "q_weight", "k_weight", "cos", "sin")),
    "fused_add_rmsnorm": OpCase(
        kunlun.fused_add_rmsnorm, add_rmsnorm.reference,
        lambda g: (torch.randn(5, 48, generator=g), torch.randn(5, 48, generator=g),
                   1 + 0.3 * torch.randn(48, generator=g), 1e-6, 0.0),
        first("x", "residual", "weight")),
    "rms_norm": OpCase(
        kunlun.rms_norm, lambda x, w, eps, off: add_rmsnorm.reference(x, None, w, eps, off)[0],
        lambda g: (torch.randn(3, 4, 48, generator=g), 1 + 0.3 * torch.randn(48, generator=g), 1e-6, 1.0),
        first("x", "weight")),
    "moe_gate": OpCase(
        kunlun.moe_gate, moe_gate.reference,
        lambda g: (torch.randn(6, 16, generator=g), 4, "sigmoid", True, 4, 2,
                   0.1 * torch.randn(16, generator=g), 2.5),
        {"router_logits": 0, "correction_bias": 6}),
    "fused_moe": OpCase(  # 3 tokens x top-2: the per-pair GEMVs
        kunlun.fused_moe, fused_moe.reference, lambda g: (*_moe_args(3, 4, 16, 8, 2, g), "silu"),
        first("x", "w13", "w2", "topk_weights", "topk_ids")),
    "linear": OpCase(  # one row: the GEMV
        kunlun.linear, linear.reference,
        lambda g: (torch.randn(1, 64, generator=g), torch.randn(40, 64, generator=g), torch.randn(40, generator=g)),
        first("x", "weight", "bias")),
    "linear_group": OpCase(
        lambda x, a, b: kunlun.linear_group(x, [a, b]), lambda x, a, b: linear.group_reference(x, [a, b]),
        lambda g: (torch.randn(1, 64, generator=g), torch.randn(40, 64, generator=g),
                   torch.randn(24, 64, generator=g)),
        first("x", "weight0", "weight1")),
    "gated_linear-gemv": OpCase(
        kunlun.gated_linear, gated_linear.reference,
        lambda g: (torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g), torch.randn(40, 64, generator=g),
                   "silu", torch.randn(1, 1, generator=g), torch.randn(1, 40, generator=g)),
        {"x": 0, "gate": 1, "weight": 2, "row_gate": 4, "addend": 5}),
    "gated_linear-cublas": OpCase(  # 8 rows: F.linear between the prologue and epilogue kernels
        kunlun.gated_linear, gated_linear.reference,
        lambda g: (torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g), torch.randn(40, 64, generator=g),
                   "sigmoid", torch.randn(8, 1, generator=g), torch.randn(8, 40, generator=g)),
        {"x": 0, "gate": 1, "weight": 2, "row_gate": 4, "addend": 5}),
    "masked_input": OpCase(  # ids off the shard and negative ones too
        kunlun.masked_input, masked_input.reference,
        lambda g: (torch.randint(-20, 120, (3, 7), generator=g), 10, 50, 3, 90, 95), first("input_ids")),
    "attention_mask": OpCase(  # positions far apart and negative: no table is read, only compared
        kunlun.attention_mask, attention_mask.reference,
        lambda g: (torch.randint(-5, 10**6, (2, 5), generator=g), torch.randint(-5, 10**6, (2, 9), generator=g),
                   torch.rand(2, 9, generator=g) > 0.3, True, 300000, torch.float32, -1e9),
        first("q_positions", "k_positions", "key_valid")),
}

STRIDED_CASES = [pytest.param(name, arg, view, id=f"{name}-{arg}-{view}")
                 for name, case in OP_CASES.items() for arg in case.tensors for view in VIEWS]


@needs_interpreter
@pytest.mark.parametrize("name,arg,view", STRIDED_CASES)
def test_each_tensor_input_as_a_view(name, arg, view):
    """One input at a time (an op that copies one odd input must not hide how it reads another)."""
    case = OP_CASES[name]
    args = case.make(seeded("view", name, arg, view))
    where = case.tensors[arg]
    viewed = list(args)
    viewed[where] = VIEWS[view](args[where])
    assert not viewed[where].is_contiguous() or viewed[where].storage_offset() > 0  # (1-D: only offset)
    with cpu_kernels(True):
        got = case.op(*viewed)
    assert_same(got, case.reference(*args))


@needs_interpreter
def test_every_other_position():
    """`torch.arange(12)[::2]` as positions (a kernel that assumes unit stride reads 0..5 instead: rel.
    error 0.06 on llama-tiny, 0.23 on qwen3-next-tiny)."""
    args = list(OP_CASES["split_norm_rope_gate-llama"].make(seeded("arange")))
    args[4] = torch.arange(12)[::2]
    with cpu_kernels(True):
        got = kunlun.split_norm_rope_gate(*args)
    assert_same(got, norm_rope_gate.reference(*args[:4], args[4].contiguous(), *args[5:]))


# fused_moe's routed paths (tiny tiles, as test_op_moe forces them), every input a view at once
ROUTED_PLANS = [
    MoePlan("small", 0, "scan", True, 16, 32, 32, 4, 2),
    MoePlan("medium", 0, "argsort", False, 16, 32, 32, 4, 2),
    MoePlan("large", 0, "block-histogram", True, 16, 16, 16, 4, 2, group_m=4, sorted_act=True, tail_m=8),
]


@needs_interpreter
@pytest.mark.parametrize("plan", ROUTED_PLANS, ids=lambda p: p.routing)
def test_fused_moe_routed_paths_read_views(plan):
    args = _moe_args(21, 4, 32, 16, 2, seeded("routed", plan.routing))
    with cpu_kernels(True):
        got = fused_moe.triton_impl(*[every_dim_strided(a) for a in args], plan=plan)
    assert_same(got, fused_moe.reference(*args))


# ---- index inputs out of range ----------------------------------------------------------------------

BAD_POSITIONS = [40, -1, 10**9]  # the table has 40 rows


@pytest.mark.parametrize("bad", BAD_POSITIONS)
@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_interpreter)])
def test_positions_past_the_table_raise_index_error_as_eager(bad, triton_path):
    args = list(OP_CASES["split_norm_rope_gate-qwen3next"].make(seeded("bad", bad)))
    args[4] = args[4].clone()
    args[4][2] = bad
    rope = RotaryEmbedding(32, 8, 40, 10000.0, True)
    with pytest.raises(IndexError):  # what eager does with the same positions
        rope(args[4], torch.randn(6, 64), torch.randn(6, 32))
    with cpu_kernels(triton_path), pytest.raises(IndexError, match=r"positions must be in \[0, 40\)"):
        kunlun.split_norm_rope_gate(*args)


@needs_interpreter
@pytest.mark.parametrize("name", ["split_norm_rope_gate-llama", "split_norm_rope_gate-qwen3next"])
def test_kernel_reads_no_table_row_for_a_bad_position_and_marks_it_nan(name):
    """The kernel alone (as on a GPU, where the wrapper does not read positions back): the table sits inside
    a larger buffer of finite values, so a read outside it would come back finite; it must not."""
    args = list(OP_CASES[name].make(seeded("nan", name)))
    table = args[3]
    buffer = torch.full((table.shape[0] + 20, table.shape[1]), 3.0)
    buffer[10:10 + table.shape[0]] = table
    args[3] = buffer[10:10 + table.shape[0]]
    positions = args[4].clone()
    positions[1], positions[4] = table.shape[0], -3  # one past the end, and before the start
    args[4] = every_dim_strided(positions)
    with cpu_kernels(True):
        q, k, gate = norm_rope_gate.triton_impl(*args)
    bad = torch.zeros(6, dtype=torch.bool)
    bad[[1, 4]] = True
    assert q[bad].isnan().all() and k[bad].isnan().all()
    good_args = [a[~bad] if i in (0, 4) else a for i, a in enumerate(args)]
    want = norm_rope_gate.reference(*good_args[:4], good_args[4].contiguous(), *good_args[5:])
    assert_same((q[~bad], k[~bad], gate[~bad]), want)


@pytest.mark.parametrize("triton_path", [False, pytest.param(True, marks=needs_interpreter)])
def test_expert_ids_out_of_range_raise_index_error(triton_path):
    args = list(_moe_args(5, 4, 16, 8, 2, seeded("ids")))
    args[4][2, 1] = 4
    with cpu_kernels(triton_path), pytest.raises(IndexError, match=r"topk_ids must be in \[0, 4\)"):
        kunlun.fused_moe(*args, "silu")


@needs_interpreter
@pytest.mark.parametrize("plan", [None, *ROUTED_PLANS], ids=lambda p: p.routing if p else "per-pair")
def test_kernels_mark_tokens_of_bad_strided_ids_nan(plan):
    args = list(_moe_args(21 if plan else 5, 4, 32, 16, 2, seeded("bad ids", plan)))
    ids = args[4].clone()
    ids[2, 1], ids[3, 0] = 9, -1
    args[4] = every_dim_strided(ids)
    with cpu_kernels(True):
        out = fused_moe.triton_impl(*args, plan=plan)
    assert out[2].isnan().all() and out[3].isnan().all()
    good = torch.ones(out.shape[0], dtype=torch.bool)
    good[[2, 3]] = False
    want = fused_moe.reference(args[0][good], args[1], args[2], args[3][good], ids[good])
    assert_same(out[good], want)


@needs_interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the NaN row
@pytest.mark.parametrize("groups", [1, 4])
def test_moe_gate_ids_stay_in_range_for_nan_logits(groups):
    """Its ids feed fused_moe: a NaN row must come out as NaN weights, not as an id past the experts
    (the kernel returned id E there, which fused_moe then refused as out of range)."""
    logits = torch.randn(3, 16, generator=seeded("nan logits", groups))
    logits[1, 5] = float("nan")
    args = (every_dim_strided(logits), 4, "softmax", True, groups, min(groups, 2), None, 1.0)
    with cpu_kernels(True):
        weights, ids = kunlun.moe_gate(*args)
    assert ((ids >= 0) & (ids < 16)).all() and weights[1].isnan().all()
    want = moe_gate.reference(logits, *args[1:])
    assert_same((weights[[0, 2]], ids[[0, 2]]), (want[0][[0, 2]], want[1][[0, 2]]))


def test_check_indices_variable_is_read_at_import():
    code = ("from kunlun_compile.ops.index_checks import checking_indices as c; "
            "from kunlun_compile.config import parse_bool_setting as p; print(c(), p('X', 'Off'))")
    env = dict(os.environ, KUNLUN_COMPILE_CHECK_INDICES="Yes", TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False"]


# ---- on a GPU: the kernels compiled, the wrapper not reading indices back unless asked -------------------

@pytest.mark.gpu
def test_gpu_strided_and_out_of_range_positions():
    args = [a.cuda() if isinstance(a, torch.Tensor) else a
            for a in OP_CASES["split_norm_rope_gate-qwen3next"].make(seeded("gpu pos"))]
    args[4] = every_dim_strided(args[4])
    assert_same(kunlun.split_norm_rope_gate(*args),
                norm_rope_gate.reference(*args[:4], args[4].contiguous(), *args[5:]))
    positions = args[4].clone()
    positions[2] = 40
    args[4] = every_dim_strided(positions)
    q, k, _ = kunlun.split_norm_rope_gate(*args)
    assert q[2].isnan().all() and k[2].isnan().all() and not q[[0, 1, 3, 4, 5]].isnan().any()
    with check_indices(True), pytest.raises(IndexError, match="positions"):
        kunlun.split_norm_rope_gate(*args)


@pytest.mark.gpu
def test_gpu_expert_ids_out_of_range():
    args = [a.cuda() for a in _moe_args(5, 4, 16, 8, 2, seeded("gpu ids"))]
    args[4][2, 1] = 4
    out = kunlun.fused_moe(*args, "silu")
    assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()
    with check_indices(True), pytest.raises(IndexError, match="topk_ids"):
        kunlun.fused_moe(*args, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("name,arg,view", [p.values for p in STRIDED_CASES
                                          if p.values[0] in ("linear", "fused_moe", "split_norm_rope_gate-llama")])
def test_gpu_each_tensor_input_as_a_view(name, arg, view):
    case = OP_CASES[name]
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case.make(seeded("gpu view", name, arg))]
    where = case.tensors[arg]
    viewed = list(args)
    viewed[where] = VIEWS[view](args[where])
    assert_same(case.op(*viewed), case.reference(*args), tol=1e-4)  # TF32-free fp32, other sum order



# ---- the fake (meta) result has the real result's layout -------------------------------------------

def _layouts(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(t.shape), t.stride() if t.numel() > 1 else None, t.dtype) for t in outs]


def dims_permuted(t: torch.Tensor) -> torch.Tensor:
    """The same values, dense but with the last two dims' strides swapped (a transposed tensor made
    contiguous and transposed back): element-wise torch ops give results in this layout."""
    return t.mT.contiguous().mT if t.dim() >= 2 else t


LAYOUT_CASES = STRIDED_CASES + [pytest.param(name, arg, "permuted", id=f"{name}-{arg}-permuted")
                                for name, case in OP_CASES.items() for arg in case.tensors]


@needs_interpreter
@pytest.mark.parametrize("triton_path", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("name,arg,view", LAYOUT_CASES)
def test_fake_result_has_the_real_layout(name, arg, view, triton_path):
    """The graph is traced with an op's fake and runs with the op: a view or a capture buffer laid out
    by the fake must fit the real result, whichever path (kernel or torch reference) computes it, for
    any input layout; and the values are the reference's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = OP_CASES[name]
    args = list(case.make(seeded("layout", name, arg, view)))
    contiguous = list(args)
    args[case.tensors[arg]] = {**VIEWS, "permuted": dims_permuted}[view](args[case.tensors[arg]])
    with cpu_kernels(triton_path):
        real = case.op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = case.op(*fakes)
    assert _layouts(fake) == _layouts(real)
    assert_same(real, case.reference(*contiguous))
