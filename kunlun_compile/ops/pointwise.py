"""kunlun::pointwise — runs one generated kernel of the generic lowering (lowering/): element-wise, or a
row kernel (a reduction with its producers and consumers; its per-row outputs keep the reduced dim as 1).

`pointwise(inputs, shape, kernel)`: `kernel` is the key of a kernel the
element-wise lowering generated (its KIR is in the registry / disk cache);
`shape` is the iteration space, symbolic in compiled graphs so one kernel
serves every batch size.  Returns the kernel's outputs, contiguous, of that
shape.  On the CPU without Triton's interpreter the KIR interpreter runs it.
"""
from __future__ import annotations

from typing import List

import torch

from ..lowering import cache  # looked up at each call (tests replace cache.kernel_for)
from .index_checks import check_index_range
from ..lowering.interpret import allocate_outputs, run_kir
from ..triton_kernel import use_triton


def check_args(inputs: List[torch.Tensor], shape: List[int], kernel: str):
    kir = cache.kir_for(kernel)
    if len(inputs) != len(kir.inputs):
        raise ValueError(f"pointwise {kernel}: expected {len(kir.inputs)} inputs, got {len(inputs)}")
    for k, (x, dt) in enumerate(zip(inputs, kir.inputs)):
        if x.dtype != dt:
            raise ValueError(f"pointwise {kernel}: input {k} must be {dt}, got {x.dtype}")
    plain = kir.plain_inputs  # read broadcast to the space; the others may have any rank
    if len(shape) > max(kir.rank, 1) or any(x.dim() > len(shape) for k, x in enumerate(inputs) if k in plain):
        raise ValueError(f"pointwise {kernel}: shape {list(shape)} does not fit rank {kir.rank} / the inputs")
    return kir


def check_gathers(kir, inputs: List[torch.Tensor], shape: List[int], kernel: str) -> None:
    """Eager raises IndexError for an id outside its table (or, for a scatter, outside the result); the kernel
    would read NaN (or write nothing).  Where the ids are an input as they are, check them on the host as the
    kunlun:: ops do (CPU always; CUDA when asked)."""
    gathered, scattered = kir.host_checked_ids
    for ids, table, dim, wraps in gathered:
        check_index_range(f"pointwise {kernel}", f"ids (input {ids}) into dim {dim} of input {table}",
                          inputs[ids], inputs[table].shape[dim], negative=wraps)
    for ids, dim, wraps, size in scattered:
        check_index_range(f"pointwise {kernel}", f"scatter ids (input {ids}) along " +
                          (f"dim {dim}" if size < 0 else f"a dim of {size}"), inputs[ids],
                          int(shape[dim]) if size < 0 else size, negative=wraps)


@torch.library.custom_op("kunlun::pointwise", mutates_args=())
def pointwise(inputs: List[torch.Tensor], shape: List[int], kernel: str) -> List[torch.Tensor]:
    kir = check_args(inputs, shape, kernel)
    check_gathers(kir, inputs, shape, kernel)
    if inputs and use_triton(inputs[0]):
        return cache.kernel_for(kernel)(inputs, shape)
    return run_kir(kir, inputs, shape)


@pointwise.register_fake
def _(inputs, shape, kernel):
    kir = check_args(inputs, shape, kernel)
    device = inputs[0].device
    return allocate_outputs(kir, shape, device)
