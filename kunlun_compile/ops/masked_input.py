"""kunlun::masked_input — vLLM's `get_masked_input_and_mask` in one kernel.

Maps global token ids to rows of this shard of a vocab-parallel embedding:
ids in [org_start, org_end) map to id - org_start, ids in the added vocabulary
[added_start, added_end) map after the shard's padded original rows, every
other id maps to 0 and is flagged in `inv_mask` (True: not on this shard).
Masked ids are int64 whatever the input's integer type, as vLLM's formulation
gives them (its mask arithmetic promotes to int64).
Eager runs ~13 kernels for this; the bounds are scalars baked into one launch.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..triton_kernel import contiguous_results, kernel, use_triton, wait_for_producers


def check_args(input_ids: torch.Tensor, org_start: int, org_end: int, padding: int, added_start: int,
               added_end: int) -> None:
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"masked_input: input_ids must be int32 or int64, got {input_ids.dtype}")
    if not (0 <= org_start <= org_end and 0 <= added_start <= added_end and padding >= 0):
        raise ValueError(f"masked_input: bad vocab ranges org [{org_start}, {org_end}), added "
                         f"[{added_start}, {added_end}), padding {padding}")


def reference(input_ids, org_start: int, org_end: int, padding: int, added_start: int, added_end: int):
    """The definition of correct, in plain torch (vLLM's formulation)."""
    org_mask = (input_ids >= org_start) & (input_ids < org_end)
    added_mask = (input_ids >= added_start) & (input_ids < added_end)
    added_offset = added_start - (org_end - org_start) - padding
    valid_offset = (org_start * org_mask) + (added_offset * added_mask)
    vocab_mask = org_mask | added_mask
    return vocab_mask * (input_ids - valid_offset), ~vocab_mask


@kernel
def _masked_input_kernel(ids_ptr, out_ptr, inv_ptr, n, org_start, org_end, added_start, added_end, added_offset,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int64)
    in_org = (ids >= org_start) & (ids < org_end)
    in_added = (ids >= added_start) & (ids < added_end)
    shifted = tl.where(in_org, ids - org_start, ids - added_offset)
    on_shard = in_org | in_added
    tl.store(out_ptr + offs, tl.where(on_shard, shifted, 0).to(tl.int64), mask=m)
    tl.store(inv_ptr + offs, (on_shard == 0).to(tl.int1), mask=m)


def triton_impl(input_ids, org_start: int, org_end: int, padding: int, added_start: int, added_end: int):
    ids = input_ids.contiguous()
    out = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    inv = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
    n = ids.numel()
    if n:
        block = 1024
        _masked_input_kernel.on(ids.device)[(triton.cdiv(n, block),)](
            ids, out, inv, n, org_start, org_end, added_start, added_end,
            added_start - (org_end - org_start) - padding, BLOCK=block, num_warps=4)
    return out, inv


@torch.library.custom_op("kunlun::masked_input", mutates_args=())
def masked_input(input_ids: torch.Tensor, org_vocab_start: int, org_vocab_end: int, num_org_vocab_padding: int,
                 added_vocab_start: int, added_vocab_end: int) -> Tuple[torch.Tensor, torch.Tensor]:
    args = (org_vocab_start, org_vocab_end, num_org_vocab_padding, added_vocab_start, added_vocab_end)
    check_args(input_ids, *args)
    if use_triton(input_ids):
        return triton_impl(input_ids, *args)
    return contiguous_results(reference(input_ids, *args))


@masked_input.register_fake
def _(input_ids, org_vocab_start, org_vocab_end, num_org_vocab_padding, added_vocab_start, added_vocab_end):
    check_args(input_ids, org_vocab_start, org_vocab_end, num_org_vocab_padding, added_vocab_start,
               added_vocab_end)
    return torch.empty(input_ids.shape, dtype=torch.int64, device=input_ids.device), \
        torch.empty(input_ids.shape, dtype=torch.bool, device=input_ids.device)
