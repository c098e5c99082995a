"""The kunlun:: fused-op library.  Importing this package registers every op.

Each op module holds: `check_args` (clear errors before any kernel runs), a
plain-torch `reference` (the definition of correct; the CPU path), a Triton
kernel (`triton_impl`; CUDA, and CPU under TRITON_INTERPRET=1), and the
`torch.library.custom_op` with its fake implementation.
"""
from . import add_rmsnorm, masked_input
from .triton_kernel import cpu_kernels, interpreter_usable, use_triton

OP_MODULES = {"fused_add_rmsnorm": add_rmsnorm, "masked_input": masked_input}

__all__ = ["OP_MODULES", "add_rmsnorm", "cpu_kernels", "interpreter_usable", "masked_input", "use_triton"]
