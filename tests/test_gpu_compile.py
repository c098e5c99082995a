"""The kernels compile for Hopper (sm_90) with Triton's real code generator and ptxas, on this CPU machine:
launches recorded under the interpreter, compiled in a process without it (tests/gpu_compile.py)."""
import torch
import triton.language as tl

from kunlun_compile.ops import cpu_kernels, fused_moe
from kunlun_compile.triton_kernel import kernel

from .gpu_compile import compile_for_gpu, recording_launches, unique
from .op_helpers import needs_interpreter, seeded
from .test_op_moe import FORCED_PLANS, OAI_ALPHA, OAI_LIMIT, moe_inputs, oai_inputs


@kernel
def _branches_of_two_types(out_ptr, n, BLOCK: tl.constexpr):
    """Runs under the interpreter (Python picks one branch); Triton's compiler refuses it: a value assigned in
    both branches of a runtime `if` must have one type."""
    offsets = tl.arange(0, BLOCK)
    if n > 4:
        scale = 2.0
    else:
        scale = 2
    tl.store(out_ptr + offsets, offsets.to(tl.float32) * scale)


@needs_interpreter
def test_a_kernel_only_the_interpreter_runs_is_reported():
    out = torch.zeros(8)
    with recording_launches() as specs, cpu_kernels(True):
        _branches_of_two_types.on(out.device)[(1,)](out, 8, BLOCK=8)
    assert torch.equal(out, torch.arange(8.0) * 2)  # the interpreter ran it
    (failure,) = compile_for_gpu(specs)
    assert failure.startswith("_branches_of_two_types") and "Error" in failure, failure


@needs_interpreter
def test_fused_moe_kernels_compile_for_hopper_with_every_plan_and_activation():
    """Every launch of every forced plan (per-pair GEMVs, scan, sorted, swizzled, descriptors, tails), with the
    SiLU of the built-in models and gpt-oss's biased, clamped, interleaved form."""
    with recording_launches() as specs, cpu_kernels(True):
        for plan in FORCED_PLANS:
            args = moe_inputs(20, 4, 32, 16, 2, torch.bfloat16, seeded("compile", plan))
            fused_moe.triton_impl(*args, plan=plan)
            args, (b13, b2) = oai_inputs(20, 4, 32, 16, 2, torch.bfloat16, seeded("compile oai", plan))
            fused_moe.triton_impl(*args, "swigluoai", plan=plan, b13=b13, b2=b2, alpha=OAI_ALPHA, limit=OAI_LIMIT)
    distinct = unique(specs)
    assert {s["name"] for s in distinct} >= {"_moe_gemm_kernel", "_moe_gemv_kernel", "_moe_gemv_sum_kernel",
                                             "_act_mul_kernel", "_sum_pairs_kernel"}
    assert any(dict((n, v) for n, _, v in s["args"]).get("OAI") for s in distinct)
    failures = compile_for_gpu(specs)
    assert not failures, "\n".join(failures)


@needs_interpreter
def test_generated_kernels_compile_for_hopper():
    """The lowering's generated kernels (element-wise and row kernels, bf16 with its rounding points): the CPU
    launches their portable form; the CUDA form, which the GPU launches with the same arguments, compiles."""
    import kunlun_compile as kc

    def fn(x, y, z):
        s = torch.softmax(x.float() * 0.5, dim=-1).to(x.dtype)
        return s * torch.sigmoid(y) + x.sum(-1, keepdim=True), (x - y).abs().amax(-1), torch.tanh(z) * z.exp()

    x, y = (torch.randn(6, 40).to(torch.bfloat16) for _ in range(2))
    z = torch.randn(3, 5, 7).to(torch.bfloat16)
    with recording_launches() as specs, cpu_kernels(True):
        got = torch.compile(fn, backend=kc.backend(strict=True))(x, y, z)
    assert all(torch.isfinite(t.float()).all() for t in got)
    names = {s["name"] for s in unique(specs)}
    assert any(n.startswith("kernel_") for n in names) and any(n.startswith("row_") for n in names), names
    failures = compile_for_gpu(specs)
    assert not failures, "\n".join(failures)


@kernel
def _tile_over_shared_memory(a_ptr, b_ptr, c_ptr, B: tl.constexpr):
    """Compiles, and runs under the interpreter; on Hopper its launch would fail: two [B, B] bf16 operand tiles
    staged in shared memory for the tensor cores are 256 KiB at B = 256."""
    r = tl.arange(0, B)
    tile = r[:, None] * B + r[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


@needs_interpreter
def test_a_kernel_over_hoppers_shared_memory_is_reported():
    a = torch.randn(256, 256).to(torch.bfloat16)
    c = torch.empty(256, 256)
    with recording_launches() as specs, cpu_kernels(True):
        _tile_over_shared_memory.on(a.device)[(1,)](a, a, c, B=256)
    (failure,) = compile_for_gpu(specs)
    assert "bytes of shared memory, over Hopper's" in failure, failure
