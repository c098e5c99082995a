"""Launching a generated row kernel (row_codegen.py): tile sizes, persistent or looped, strides.

The launch is planned per (shape, input layouts), as for element-wise kernels: kept dims (all
but the reduced one) are coalesced where every operand is contiguous across them, strides are
taken from the tensors (0 where an input is broadcast), outputs are allocated contiguous.

Tile choice.  A row up to PERSISTENT_MAX_R elements is one tile (persistent: one read of the
row, everything in registers); longer rows are walked in LOOP_BLOCK_R chunks, once per
reduction phase and once to store.  Short rows share a program (BLOCK_M rows per tile, up to
ROW_TILE elements) so that a program moves enough bytes to hide its launch and latency.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import triton

from ..triton_kernel import Kernel
from .codegen import broadcast_strides, coalesce, indexed_input_ranks
from .interpret import allocate_outputs, run_kir
from .kir import KernelIR
from .row_codegen import full_outputs, kept_rank

PERSISTENT_MAX_R = 4096
LOOP_BLOCK_R = 4096  # 1024 left a one-row decode log_softmax (32000 wide) waiting on 96 loop trips
LOOP_WARPS = 16  # looped rows (row_tiles_h200.json): 16 warps beat 8 at 1, 64 and 1024 rows of 32000 by 1.2-1.3x
ROW_TILE = 2048  # elements per program a short row's tile aims at
_INT32_LIMIT = 2**31 - 1


def tile_plan(rows: int, row_len: int) -> Tuple[bool, int, int, int]:
    """(persistent, BLOCK_M, BLOCK_R, num_warps) for `rows` rows of `row_len` elements."""
    block_r = triton.next_power_of_2(max(row_len, 1))
    persistent = block_r <= PERSISTENT_MAX_R
    if not persistent:
        block_r = LOOP_BLOCK_R
    block_m = 1 if not persistent else max(1, min(ROW_TILE // block_r, triton.next_power_of_2(max(rows, 1))))
    tile = block_m * block_r
    warps = 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 2048 else 8
    return persistent, block_m, block_r, warps if persistent else LOOP_WARPS


class RowKernel:
    """Launches one generated row kernel."""

    def __init__(self, kir: KernelIR, module, path: Path):
        self.kir, self.path = kir, path
        self.rank = max(kir.rank, 1)
        self._fns = {(form, cuda): Kernel(getattr(module, f"row_{form}_{'cuda' if cuda else 'portable'}"))
                     for form in ("persistent", "looped") for cuda in (True, False)}
        self._full = full_outputs(kir)
        self._indexed = list(indexed_input_ranks(kir))
        self._plans: Dict[tuple, tuple] = {}

    def _plan(self, inputs: Sequence[torch.Tensor], shape: Tuple[int, ...], outs: Sequence[torch.Tensor]) -> tuple:
        sig = (shape, tuple((x.shape, x.stride()) for x in inputs))
        plan = self._plans.get(sig)
        if plan is None:
            d = self.kir.reduce_dim
            # an input read only at index expressions has no strides over the space
            strides = [broadcast_strides(x, self.rank) if k in self.kir.plain_inputs else [0] * self.rank
                       for k, x in enumerate(inputs)]
            strides += [broadcast_strides(outs[k], self.rank) for k in self._full]  # outputs: as allocated
            kept = [s for k, s in enumerate(shape) if k != d] or [1]
            kept_strides = [[st for k, st in enumerate(s) if k != d] or [0] for s in strides]
            row_strides = [s[d] for s in strides]
            # a kernel reading at index expressions computes every kept coordinate: no dims merged
            sizes, sts = (list(kept), kept_strides) if self.kir.indexed else coalesce(tuple(kept), kept_strides)
            rows, row_len = math.prod(kept), shape[d]
            reach = max([rows * row_len] + [sum((n - 1) * abs(st) for n, st in zip(sizes, s)) + (row_len - 1) * abs(rs)
                                             for s, rs in zip(sts, row_strides)]
                        + [sum((n - 1) * abs(st) for n, st in zip(inputs[k].shape, inputs[k].stride()))
                           for k in self._indexed])
            kr = kept_rank(self.kir)
            full_sizes = [1] * (kr - len(sizes)) + sizes
            full_sts = [[0] * (kr - len(sizes)) + s for s in sts]
            args = full_sizes[1:] + [st for s in full_sts for st in s] + row_strides
            for k in self._indexed:  # raw strides, then sizes, of each input read at index expressions
                args += list(inputs[k].stride()) + list(inputs[k].shape)
            plan = self._plans[sig] = (rows, row_len, args, len(sizes), reach > _INT32_LIMIT)
            if len(self._plans) > 256:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def __call__(self, inputs: Sequence[torch.Tensor], shape: Sequence[int]) -> List[torch.Tensor]:
        shape = tuple(int(s) for s in shape)
        device = inputs[0].device
        outs = allocate_outputs(self.kir, shape, device)  # contiguous, or in the layout the kernel keeps
        rows, row_len, args, krank, index64 = self._plan(inputs, shape, outs)
        if row_len == 0:  # an empty row (a symbolic length of 0): eager's own answer (0, NaN, or its error)
            return run_kir(self.kir, inputs, shape)
        if rows == 0:
            return outs
        persistent, block_m, block_r, warps = tile_plan(rows, row_len)
        fn = self._fns[("persistent" if persistent else "looped", device.type == "cuda")].on(device)
        with np.errstate(all="ignore"):  # interpreter: lanes past the row's end compute on zeros (masked)
            fn[(triton.cdiv(rows, block_m),)](*inputs, *outs, rows, row_len, *args, KRANK=krank, INDEX64=index64,
                                              BLOCK_M=block_m, BLOCK_R=block_r, num_warps=warps,
                                              enable_fp_fusion=False)  # eager's roundings (cache.py)
        return outs
