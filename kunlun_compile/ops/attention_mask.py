"""kunlun::attention_mask — causal / sliding-window / padding masks in one kernel.

    allowed[.., i, j] = (not causal or k_pos[j] <= q_pos[i])
                        and (sliding_window == 0 or q_pos[i] - k_pos[j] < sliding_window)
                        and key_valid[.., j]                       (when given)
    out = allowed                                   when dtype is torch.bool
        = 0 where allowed, masked_value elsewhere   for a float dtype (additive mask)

Positions are [T] / [S] for one sequence or [B, T] / [B, S] for a padded batch
(then the mask is [B, T, S]); `key_valid` is the padding mask, True for real
keys.  Models build this by hand from comparisons, `masked_fill` and
`torch.full` (6-10 kernels); `masked_value` is -inf for vLLM-style masks and
`finfo(dtype).min` for HF-style ones.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_kernel import kernel, use_triton, wait_for_producers


def check_args(q_positions, k_positions, key_valid, sliding_window: int, dtype: torch.dtype) -> None:
    name = "attention_mask"
    if q_positions.dim() not in (1, 2) or q_positions.dim() != k_positions.dim():
        raise ValueError(f"{name}: positions must be [T] and [S], or [B, T] and [B, S]; got "
                         f"{tuple(q_positions.shape)} and {tuple(k_positions.shape)}")
    if q_positions.dim() == 2 and q_positions.shape[0] != k_positions.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: {tuple(q_positions.shape)}, {tuple(k_positions.shape)}")
    for t in (q_positions, k_positions):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: positions must be int32 or int64, got {t.dtype}")
    if key_valid is not None and (key_valid.dtype != torch.bool or key_valid.shape != k_positions.shape):
        raise ValueError(f"{name}: key_valid must be bool shaped like k_positions {tuple(k_positions.shape)}, "
                         f"got {key_valid.dtype} {tuple(key_valid.shape)}")
    if sliding_window < 0:
        raise ValueError(f"{name}: sliding_window must be >= 0 (0: none), got {sliding_window}")
    if dtype != torch.bool and not dtype.is_floating_point:
        raise ValueError(f"{name}: dtype must be torch.bool or a float dtype, got {dtype}")


def _out_shape(q_positions, k_positions):
    return (*q_positions.shape, k_positions.shape[-1])


def reference(q_positions, k_positions, key_valid, causal: bool, sliding_window: int, dtype: torch.dtype,
              masked_value: float) -> torch.Tensor:
    """The definition of correct, in plain torch."""
    q = q_positions.unsqueeze(-1)
    k = k_positions.unsqueeze(-2)
    allowed = torch.ones(_out_shape(q_positions, k_positions), dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed & (k <= q)
    if sliding_window:
        allowed = allowed & (q - k < sliding_window)
    if key_valid is not None:
        allowed = allowed & key_valid.unsqueeze(-2)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=q.device).masked_fill(~allowed, masked_value)


@kernel
def _attention_mask_kernel(q_ptr, k_ptr, valid_ptr, out_ptr, T, S, q_batch_stride, k_batch_stride, window,
                           masked_value,
                           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_VALID: tl.constexpr,
                           AS_BOOL: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BT + tl.arange(0, BT)
    j = tl.program_id(2) * BS + tl.arange(0, BS)
    i_ok, j_ok = i < T, j < S
    qp = tl.load(q_ptr + b * q_batch_stride + i, mask=i_ok, other=0).to(tl.int64)
    kp = tl.load(k_ptr + b * k_batch_stride + j, mask=j_ok, other=0).to(tl.int64)
    allowed = j_ok[None, :] | (i < 0)[:, None]  # all True where in bounds, as a [BT, BS] block
    if CAUSAL:
        allowed = allowed & (kp[None, :] <= qp[:, None])
    if WINDOW:
        allowed = allowed & (qp[:, None] - kp[None, :] < window)
    if HAS_VALID:
        allowed = allowed & (tl.load(valid_ptr + b * S + j, mask=j_ok, other=0) != 0)[None, :]
    ptrs = out_ptr + b * T * S + i[:, None].to(tl.int64) * S + j[None, :]
    m = i_ok[:, None] & j_ok[None, :]
    if AS_BOOL:
        tl.store(ptrs, allowed.to(tl.int8), mask=m)
    else:
        tl.store(ptrs, tl.where(allowed, 0.0, masked_value).to(out_ptr.dtype.element_ty), mask=m)


def triton_impl(q_positions, k_positions, key_valid, causal: bool, sliding_window: int, dtype: torch.dtype,
                masked_value: float) -> torch.Tensor:
    shape = _out_shape(q_positions, k_positions)
    B = q_positions.shape[0] if q_positions.dim() == 2 else 1
    T, S = q_positions.shape[-1], k_positions.shape[-1]
    # rows with unit stride are read in place: a batch of positions expanded from one row has batch stride 0
    qp, kp = (p if p.stride(-1) == 1 else p.contiguous() for p in (q_positions, k_positions))
    # bool is stored through an int8 view: same bytes, and Triton stores int8 everywhere
    out = torch.empty(shape, dtype=torch.int8 if dtype == torch.bool else dtype, device=qp.device)
    valid = key_valid.contiguous().view(torch.int8) if key_valid is not None else qp
    if out.numel():
        grid = (B, triton.cdiv(T, 32), triton.cdiv(S, 128))
        _attention_mask_kernel.on(qp.device)[grid](
            qp, kp, valid, out, T, S, qp.stride(0) if qp.dim() == 2 else 0, kp.stride(0) if kp.dim() == 2 else 0,
            sliding_window, masked_value, CAUSAL=causal, WINDOW=sliding_window > 0,
            HAS_VALID=key_valid is not None, AS_BOOL=dtype == torch.bool, BT=32, BS=128, num_warps=4)
    return out.view(torch.bool) if dtype == torch.bool else out


@torch.library.custom_op("kunlun::attention_mask", mutates_args=())
def attention_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, key_valid: Optional[torch.Tensor],
                   causal: bool, sliding_window: int, dtype: torch.dtype, masked_value: float) -> torch.Tensor:
    check_args(q_positions, k_positions, key_valid, sliding_window, dtype)
    args = (q_positions, k_positions, key_valid, causal, sliding_window, dtype, masked_value)
    if use_triton(q_positions):
        return triton_impl(*args)
    return reference(*args)


@attention_mask.register_fake
def _(q_positions, k_positions, key_valid, causal, sliding_window, dtype, masked_value):
    check_args(q_positions, k_positions, key_valid, sliding_window, dtype)
    return q_positions.new_empty(_out_shape(q_positions, k_positions), dtype=dtype)
