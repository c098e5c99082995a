"""Sorting (token, expert) pairs into blocks of one expert each, for the grouped GEMM.

Output, for block size BM:
  sorted_pairs [capacity] int32: pair indices (m·k + j) grouped by expert, each
      expert's run padded to a multiple of BM with the sentinel P = M·k;
  block_expert [max_blocks] int32: the expert of each block, -1 past the end.
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

from typing import Tuple

import torch
import triton
import triton.language as tl

from .triton_kernel import kernel, wait_for_producers

HISTOGRAM_BLOCK = 128  # pairs per program of the block statistics


def block_capacity(pairs: int, num_experts: int, block_m: int) -> Tuple[int, int]:
    """(max blocks, padded length) for any routing of `pairs` pairs over `num_experts` experts."""
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
def _align_kernel(totals_ptr, pstart_ptr, block_expert_ptr, max_blocks, E: tl.constexpr, BM: tl.constexpr,
                  BE: tl.constexpr, BB: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    e = tl.arange(0, BE)
    total = tl.load(totals_ptr + e, mask=e < E, other=0)
    padded = (total + BM - 1) // BM * BM
    pend = tl.cumsum(padded, axis=0)
    tl.store(pstart_ptr + e, pend - padded, mask=e < E)
    for b0 in range(0, max_blocks, BB):
        b = b0 + tl.arange(0, BB)
        owner = tl.sum((pend[None, :] <= b[:, None] * BM).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(owner < E, owner, -1), mask=b < max_blocks)


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


def sort_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int, routing: str):
    """(sorted_pairs, block_expert) for `routing` in {"argsort", "block-histogram"}."""
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
        _block_prefix_kernel.on(device)[(triton.cdiv(E, 32),)](counts, block_offsets, totals, nb, E=E, BR=64,
                                                                BE=32)
    else:
        raise ValueError(f"sort_pairs: unknown routing {routing!r}")
    pstart = torch.empty(E, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    _align_kernel.on(device)[(1,)](totals, pstart, block_expert, max_blocks, E=E, BM=block_m,
                                   BE=triton.next_power_of_2(E), BB=64)
    sorted_pairs = torch.full((capacity,), P, dtype=torch.int32, device=device)
    place_block = 1024
    _place_kernel.on(device)[(triton.cdiv(P, place_block),)](
        ids, rank, pstart, block_offsets, sorted_pairs, P, E=E, HIST_BLOCK=HISTOGRAM_BLOCK,
        BLOCK_OFFSETS=routing == "block-histogram", BLOCK=place_block)
    return sorted_pairs, block_expert
