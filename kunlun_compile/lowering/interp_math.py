"""Math functions for generated kernels under Triton's interpreter (CPU tests).

`tl.math` covers exp, exp2, log, log2, sqrt, rsqrt, sin, cos and erf in the
interpreter, but not tanh, expm1, log1p or pow, and libdevice (what the CUDA
kernels call) is not interpretable.  These evaluate the missing ones with
numpy on the interpreter's tensors, in the tensor's own dtype.  `to_bf16`
replaces the interpreter's fp32 -> bf16 cast, which truncates.  They are only
ever called from the interpreter flavour of a generated kernel.
"""
from __future__ import annotations

import numpy as np
import triton.language as tl


def _numpy(fn):
    def op(*xs):
        from triton.runtime.interpreter import TensorHandle

        first = next(x for x in xs if isinstance(x, tl.core.tensor))
        data = [x.handle.data if isinstance(x, tl.core.tensor) else x for x in xs]
        with np.errstate(all="ignore"):
            out = fn(*data).astype(first.handle.data.dtype)
        return tl.core.tensor(TensorHandle(out, first.handle.dtype.scalar), first.type)
    op.__name__ = fn.__name__
    return op


def to_bf16(x):
    """fp32/fp64 -> bf16 rounded to nearest even, as torch and the GPU do (the interpreter's own cast truncates)."""
    import torch
    from triton.runtime.interpreter import TensorHandle

    data = torch.from_numpy(np.ascontiguousarray(x.handle.data)).to(torch.bfloat16).view(torch.int16).numpy()
    shape = tl.block_type(tl.bfloat16, x.type.shape) if x.type.is_block() else tl.bfloat16
    return tl.core.tensor(TensorHandle(data.view(np.uint16), tl.bfloat16), shape)


tanh = _numpy(np.tanh)
idiv = _numpy(lambda x, y: np.abs(x) // np.abs(y) * np.sign(x) * np.sign(y))  # C's: truncates toward 0
expm1 = _numpy(np.expm1)
log1p = _numpy(np.log1p)
pow = _numpy(np.power)  # noqa: A001 - the KIR op's name
