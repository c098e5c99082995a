"""The kunlun:: fused-op library.  Importing this package registers every op.

Each op module holds: `check_args` (clear errors before any kernel runs), a
plain-torch `reference` (the definition of correct; the CPU path), a Triton
kernel (`triton_impl`; CUDA, and CPU under TRITON_INTERPRET=1), and the
`torch.library.custom_op` with its fake implementation.  `act_and_mul`, `experts`,
`grouped_mm`, `rmsnorm_primitive`, `rotary` and `router` are primitives the gated-linear, expert-dispatch, norm,
prologue and router rules are written with (no kernel: a graph never keeps them).
"""
from ..triton_kernel import cpu_kernels, interpreter_usable, use_triton
from . import (act_and_mul, add_rmsnorm, attention_mask, experts, fused_moe, gated_linear, grouped_mm, linear,
               masked_input, moe_gate, norm_rope_gate, pointwise, qk_norm_rope, rmsnorm_primitive, rotary, router)
from .index_checks import check_indices

OP_MODULES = {
    "split_norm_rope_gate": norm_rope_gate,
    "qk_norm_rope": qk_norm_rope,
    "fused_add_rmsnorm": add_rmsnorm,
    "rms_norm": add_rmsnorm,
    "moe_gate": moe_gate,
    "fused_moe": fused_moe,
    "linear": linear,
    "gated_linear": gated_linear,
    "masked_input": masked_input,
    "attention_mask": attention_mask,
    "pointwise": pointwise,
}

__all__ = ["OP_MODULES", "act_and_mul", "add_rmsnorm", "attention_mask", "check_indices", "cpu_kernels", "experts",
           "fused_moe", "gated_linear", "grouped_mm", "interpreter_usable", "masked_input", "moe_gate",
           "norm_rope_gate", "qk_norm_rope", "rmsnorm_primitive", "rotary", "router", "use_triton"]
