"""Sorting (token, expert) pairs into blocks of one expert each, for the grouped GEMM.

Output (`SortedPairs`), for block size BM and an optional tail size TM < BM:
  pairs [capacity] int32: pair indices (m·k + j) grouped by expert, each
      expert's run padded with the sentinel P = M·k;
  unit_expert, unit_start, unit_rows [max_units] int32: the units (blocks of one
      expert) the grouped GEMM runs, in expert order: expert, first slot, rows
      (BM, or TM for the tail unit); expert -1 past the end.  With TM, an expert
      whose run ends at most TM pairs past its last full BM block gets a TM-row
      unit there instead of a padded BM-row one (half the padding on average at
      TM = BM / 2); the tail stays next to its expert's other units, so the GEMM
      runs it while that expert's weights are still in L2;
  num_units [2] int32: units in use, and how many of them are tails.
Capacity is an upper bound fixed by the sizes, so nothing is read back to the
host (the grid is launched at the bound; blocks past the end exit at once) —
which keeps the op capturable in a CUDA graph.

Two ways to find each pair's rank within its expert (the plan chooses):
- `argsort`: a stable sort of the ids (medium path).
- `block-histogram`: per block of pairs, a histogram over experts and each
  pair's rank among equal ids in its block; prefix sums over blocks place the
  blocks (large path).  Stable like the sort, without a comparison sort.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from ..triton_kernel import kernel, wait_for_producers

HISTOGRAM_BLOCK = 128  # pairs per program of the block statistics
# experts per program of the prefix sums over blocks (H100, M=8192, top-8: 32 -> 8 took it 9.9 -> 6.8 µs)
PREFIX_EXPERTS = 8
ALIGN_BLOCKS = 64  # blocks per program of the block -> expert table


class SortedPairs(NamedTuple):
    pairs: torch.Tensor
    unit_expert: torch.Tensor
    unit_start: torch.Tensor
    unit_rows: torch.Tensor
    num_units: torch.Tensor


def block_capacity(pairs: int, num_experts: int, block_m: int) -> Tuple[int, int]:
    """(max blocks, padded length) for any routing of `pairs` pairs over `num_experts` experts (also
    with tails: a tail unit replaces a block)."""
    max_blocks = triton.cdiv(pairs, block_m) + min(num_experts, pairs)
    return max_blocks, max_blocks * block_m


@kernel
def _block_histogram_kernel(ids_ptr, counts_ptr, rank_ptr, P, E: tl.constexpr, BLOCK: tl.constexpr,
                            BE: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    b = tl.program_id(0)
    i = b * BLOCK + tl.arange(0, BLOCK)
    ok = i < P
    ids = tl.load(ids_ptr + i, mask=ok, other=-1)
    e = tl.arange(0, BE)
    counts = tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + b * E + e, counts, mask=e < E)
    # rank among equal ids earlier in this block
    j = tl.arange(0, BLOCK)
    earlier = (ids[None, :] == ids[:, None]) & (j[None, :] < j[:, None])
    tl.store(rank_ptr + i, tl.sum(earlier.to(tl.int32), axis=1), mask=ok)


@kernel
def _block_prefix_kernel(counts_ptr, offsets_ptr, totals_ptr, NB, E: tl.constexpr, BR: tl.constexpr,
                         BE: tl.constexpr, PDL: tl.constexpr):
    """offsets[b, e] = Σ_{b' < b} counts[b', e] (pairs of expert e in earlier blocks); totals[e] = the
    whole column.  One program per BE experts walks the blocks BR rows at a time (torch.cumsum over
    dim 0 of the [blocks, E] table took 93 µs at M=8192, top-8; this is a few µs)."""
    wait_for_producers(PDL)
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    e_ok = e < E
    carry = tl.zeros([BE], dtype=tl.int32)
    for b0 in range(0, NB, BR):
        b = b0 + tl.arange(0, BR)
        ok = (b < NB)[:, None] & e_ok[None, :]
        c = tl.load(counts_ptr + b[:, None] * E + e[None, :], mask=ok, other=0)
        tl.store(offsets_ptr + b[:, None] * E + e[None, :], tl.cumsum(c, axis=0) - c + carry[None, :], mask=ok)
        carry += tl.sum(c, axis=0)
    tl.store(totals_ptr + e, carry, mask=e_ok)


@kernel
def _align_kernel(totals_ptr, pstart_ptr, unit_expert_ptr, unit_start_ptr, unit_rows_ptr, num_units_ptr, max_units,
                  E: tl.constexpr, BM: tl.constexpr, TM: tl.constexpr, BE: tl.constexpr, BB: tl.constexpr,
                  PDL: tl.constexpr):
    """Each expert's padded start and the unit counts (program 0 stores them), and the unit table:
    program b owns units [b·BB, (b+1)·BB).  Every program redoes the E-long prefix sums, which is
    cheaper than a serial walk over all units in one program (9.4 µs at M=8192, top-8, 640 units)."""
    wait_for_producers(PDL)
    e = tl.arange(0, BE)
    e_ok = e < E
    total = tl.load(totals_ptr + e, mask=e_ok, other=0)
    if TM > 0:
        rem = total % BM
        big = total // BM + (rem > TM).to(tl.int32)
        tail = ((rem > 0) & (rem <= TM)).to(tl.int32)
    else:
        big = (total + BM - 1) // BM
        tail = tl.zeros([BE], dtype=tl.int32)
    padded = big * BM + tail * TM
    pstart = tl.cumsum(padded, axis=0) - padded
    units = big + tail
    unit_end = tl.cumsum(units, axis=0)
    if tl.program_id(0) == 0:
        tl.store(pstart_ptr + e, pstart, mask=e_ok)
        tl.store(num_units_ptr, tl.sum(units, axis=0))
        tl.store(num_units_ptr + 1, tl.sum(tail, axis=0))
    u = tl.program_id(0) * BB + tl.arange(0, BB)
    owner = tl.sum((unit_end[None, :] <= u[:, None]).to(tl.int32), axis=1)
    mine = e[None, :] == owner[:, None]
    j = u - tl.sum(tl.where(mine, unit_end - units, 0), axis=1)  # the unit's index within its expert
    start = tl.sum(tl.where(mine, pstart, 0), axis=1) + j * BM
    rows = tl.where(j < tl.sum(tl.where(mine, big, 0), axis=1), BM, TM)
    ok = u < max_units
    tl.store(unit_expert_ptr + u, tl.where(owner < E, owner, -1), mask=ok)
    tl.store(unit_start_ptr + u, start, mask=ok)
    tl.store(unit_rows_ptr + u, rows, mask=ok)


@kernel
def _place_kernel(ids_ptr, rank_ptr, pstart_ptr, block_offsets_ptr, sorted_ptr, P, E: tl.constexpr,
                  HIST_BLOCK: tl.constexpr, BLOCK_OFFSETS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + p, mask=p < P, other=0)
    ok = (p < P) & (e >= 0) & (e < E)  # an id out of range is left out (fused_moe returns NaN for its token)
    dst = tl.load(pstart_ptr + e, mask=ok, other=0) + tl.load(rank_ptr + p, mask=ok, other=0)
    if BLOCK_OFFSETS:
        dst += tl.load(block_offsets_ptr + (p // HIST_BLOCK) * E + e, mask=ok, other=0)
    tl.store(sorted_ptr + dst, p.to(tl.int32), mask=ok)


def sort_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int, routing: str, tail_m: int = 0) -> SortedPairs:
    """The pairs of `topk_ids` sorted into units of one expert, for `routing` in {"argsort",
    "block-histogram"}: `block_m` rows each, or `tail_m` rows at an expert's end (0: no tails)."""
    if tail_m and not 0 < tail_m < block_m:
        raise ValueError(f"sort_pairs: tail_m={tail_m} must be below block_m={block_m}")
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32)
    P = ids.numel()
    E = num_experts
    max_blocks, capacity = block_capacity(P, E, block_m)
    if routing == "argsort":
        key = torch.where((ids >= 0) & (ids < E), ids, E)  # out-of-range ids sort last; _place_kernel drops them
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(E + 1, dtype=torch.int32, device=device).scatter_add_(0, key.long(), torch.ones_like(ids))
        expert_start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        rank = torch.empty_like(ids)
        rank[order] = torch.arange(P, dtype=torch.int32, device=device) - expert_start[key[order].long()]
        totals = counts[:E].contiguous()
        block_offsets = rank  # a valid pointer for the launch; _place_kernel reads it only for block-histogram
    elif routing == "block-histogram":
        nb = triton.cdiv(P, HISTOGRAM_BLOCK)
        counts = torch.empty(nb, E, dtype=torch.int32, device=device)
        rank = torch.empty_like(ids)
        _block_histogram_kernel.on(device)[(nb,)](ids, counts, rank, P, E=E, BLOCK=HISTOGRAM_BLOCK,
                                                   BE=triton.next_power_of_2(E))
        totals = torch.empty(E, dtype=torch.int32, device=device)
        block_offsets = torch.empty_like(counts)  # pairs of the same expert in earlier blocks
        _block_prefix_kernel.on(device)[(triton.cdiv(E, PREFIX_EXPERTS),)](
            counts, block_offsets, totals, nb, E=E, BR=64, BE=PREFIX_EXPERTS)
    else:
        raise ValueError(f"sort_pairs: unknown routing {routing!r}")
    pstart = torch.empty(E, dtype=torch.int32, device=device)
    unit_expert, unit_start, unit_rows = (torch.empty(max_blocks, dtype=torch.int32, device=device)
                                          for _ in range(3))
    num_units = torch.empty(2, dtype=torch.int32, device=device)
    _align_kernel.on(device)[(triton.cdiv(max_blocks, ALIGN_BLOCKS),)](
        totals, pstart, unit_expert, unit_start, unit_rows, num_units, max_blocks, E=E, BM=block_m, TM=tail_m,
        BE=triton.next_power_of_2(E), BB=ALIGN_BLOCKS)
    sorted_pairs = torch.full((capacity,), P, dtype=torch.int32, device=device)
    place_block = 1024
    _place_kernel.on(device)[(triton.cdiv(P, place_block),)](
        ids, rank, pstart, block_offsets, sorted_pairs, P, E=E, HIST_BLOCK=HISTOGRAM_BLOCK,
        BLOCK_OFFSETS=routing == "block-histogram", BLOCK=place_block)
    return SortedPairs(sorted_pairs, unit_expert, unit_start, unit_rows, num_units)
