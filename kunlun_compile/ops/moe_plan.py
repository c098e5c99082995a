"""How `kunlun::fused_moe` runs a given problem: a pure function of the sizes.

The path is chosen by the number of (token, expert) pairs, M·top_k, as
vLLM-Kunlun's fused MoE does (seeds/000):
- small  (M·k < 400):  no sorting.  Latency-bound decode sizes.  Up to
  PER_PAIR_MAX_PAIRS pairs, one GEMV program per (pair, column block) reads its
  expert id from the table ("per-pair": a tl.dot tile needs >= 16 rows, so at
  M=1 it would run 1/16 full on few programs).  Above that each program owns one
  expert and scans the [M, k] id table for its tokens ("scan"); experts nobody
  chose exit at once, so each chosen expert's weights are read once.
- medium (400 ≤ M·k ≤ 768): pairs sorted by expert (a stable argsort) into
  blocks of one expert each, then a grouped GEMM over the blocks.
- large  (M·k > 768): per-block expert statistics (a histogram per block of
  pairs, prefix sums) give each pair its place with no comparison sort; the
  grouped GEMM runs on larger tiles.
SwiGLU is fused into the first GEMM's epilogue (gate and up tiles computed by
the same program) on every path.  vLLM-Kunlun fuses it only from M ≥ 1024; on
these Triton kernels the fused form saves a launch and the gate|up round trip
and was not slower beyond noise (H100, 128 experts, top-8, H=2048, I=768,
CUDA-graph replay: M=1 0.0490 vs 0.0496 ms, M=128 0.446 vs 0.450, M=1024 0.580
vs 0.572, M=8192 1.98 vs 2.07; benchmarks/NOTES.md).  The unfused form (first
GEMM writes gate|up, a separate pass applies SwiGLU) stays available through
`swiglu_fused=False` for comparison.
Tiles come from the sweep in benchmarks/sweep_kernels.py.

`kunlun-compile` shows the plan of every fused_moe call it finds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SMALL_MAX_PAIRS = 400  # M·k below this: small path
MEDIUM_MAX_PAIRS = 768  # M·k up to this: medium path
# M·k up to this: small path, one GEMV per pair (re-reads an expert two tokens share).  H100, bf16,
# H=2048, I=768, top-8, graph replay (benchmarks/NOTES.md v7): per-pair beats scan up to M=4 at 64
# and 128 experts (M=1: 31 vs 38 µs), ties at M=8 with 128 experts, loses at M=8 with 64.
PER_PAIR_MAX_PAIRS = 32


@dataclass(frozen=True)
class MoePlan:
    path: str  # "small" | "medium" | "large"
    pairs: int  # M·top_k
    routing: str  # how pairs reach their expert's program: "per-pair" | "scan" | "argsort" | "block-histogram"
    swiglu_fused: bool
    block_m: int  # rows (pairs) per program
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # GEMM2's tile (block_n, block_k, num_warps[, num_stages]) when it differs from GEMM1's
    gemm2: tuple = ()
    # sorted routing only: > 0 launches a 1-D grid where group_m neighbouring blocks sweep their
    # column blocks together; sorted_act makes GEMM1 write the SwiGLU output in sorted order
    group_m: int = 0
    sorted_act: bool = False
    # weight tiles (and GEMM2's sorted A tiles) through tensor descriptors (TMA) where tiles are whole
    tma: bool = False
    # sorted routing only, > 0: an expert's last rows, when at most tail_m, get a tail_m-row unit (next to
    # the expert's other units, same launch) instead of a padded block_m-row one
    tail_m: int = 0

    def gemm2_tiles(self) -> tuple:
        return self.gemm2 or (self.block_n, self.block_k, self.num_warps)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        swiglu = "fused into GEMM1" if self.swiglu_fused else "separate pass"
        tiles = f"tiles {self.block_m}x{self.block_n}x{self.block_k}, {self.num_warps} warps"
        if self.gemm2 and self.routing != "per-pair":
            tiles += f", GEMM2 {self.block_m}x{self.gemm2[0]}x{self.gemm2[1]}/{self.gemm2[2]} warps"
            tiles += f"/{self.gemm2[3]} stages" if len(self.gemm2) > 3 else ""
        if self.group_m:
            tiles += f", grid swizzled by {self.group_m} blocks"
        if self.sorted_act:
            tiles += ", SwiGLU output kept in sorted order"
        if self.tma:
            tiles += ", TMA descriptors"
        if self.tail_m and self.routing not in ("per-pair", "scan"):
            tiles += f", experts' last rows in {self.tail_m}-row tiles"
        if self.routing == "per-pair":
            bn, bk, warps = self.gemm2_tiles()
            tiles = (f"GEMV tiles {self.block_n}x{self.block_k}/{self.num_warps} warps, "
                     f"GEMM2 (summing the k pairs) {bn}x{bk}/{warps} warps")
        return f"{self.path} path ({self.pairs} pairs), routing {self.routing}, SwiGLU {swiglu}, {tiles}"


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan_fused_moe(num_tokens: int, top_k: int, num_experts: int) -> MoePlan:
    if num_tokens < 0 or top_k < 1 or num_experts < 1:
        raise ValueError(f"plan_fused_moe: bad sizes M={num_tokens}, top_k={top_k}, E={num_experts}")
    pairs = num_tokens * top_k
    if pairs <= PER_PAIR_MAX_PAIRS:
        return MoePlan("small", pairs, routing="per-pair", swiglu_fused=True, block_m=1, block_n=8, block_k=128,
                       num_warps=8, num_stages=1, gemm2=(2, 128, 4))  # tiles from the kernel sweep
    if pairs < SMALL_MAX_PAIRS:
        # one program per (expert, column block, chunk of tokens); tl.dot needs >= 16 rows
        block_m = min(max(_pow2_at_least(num_tokens), 16), 64)
        return MoePlan("small", pairs, routing="scan", swiglu_fused=True, block_m=block_m, block_n=64, block_k=128,
                       num_warps=4, num_stages=4)
    if pairs <= MEDIUM_MAX_PAIRS:
        return MoePlan("medium", pairs, routing="argsort", swiglu_fused=True, block_m=16, block_n=64, block_k=128,
                       num_warps=4, num_stages=4)
    per_expert = pairs / num_experts
    if per_expert >= 128:
        # many rows per expert: the GEMMs are compute-bound, so big tiles, a swizzled grid (neighbouring
        # blocks share weight tiles in L2), GEMM1 writing in sorted order (GEMM2 reads it contiguously),
        # TMA for the weights, and experts' last rows in 64-row units (less padding than 128-row blocks);
        # measured step by step in benchmarks/NOTES.md (v9, v12)
        return MoePlan("large", pairs, routing="block-histogram", swiglu_fused=True, block_m=128, block_n=128,
                       block_k=64, num_warps=8, num_stages=4, gemm2=(256, 64, 8), group_m=8, sorted_act=True,
                       tma=True, tail_m=64)
    if per_expert >= 32:  # the same options on 64-row blocks (benchmarks/NOTES.md v9)
        return MoePlan("large", pairs, routing="block-histogram", swiglu_fused=True, block_m=64, block_n=128,
                       block_k=64, num_warps=8, num_stages=4, group_m=8, sorted_act=True, tma=True)
    return MoePlan("large", pairs, routing="block-histogram", swiglu_fused=True, block_m=16, block_n=64, block_k=128,
                   num_warps=4, num_stages=4)


# Hopper has 227 KB of shared memory per block; keep a margin for the epilogue's scratch.
SHARED_MEMORY_BUDGET = 200 * 1024


def fit_shared_memory(plan: MoePlan, element_size: int) -> MoePlan:
    """Fewer pipeline stages, then a shorter K tile, until the operand tiles fit in shared memory.

    The tiles above were swept in bf16; fp32 operands take twice the bytes (a 64-row small-path
    tile with the SwiGLU pair needs 288 KB at 3 stages in fp32)."""
    from dataclasses import replace

    def need(p: MoePlan) -> int:
        b_tiles = 2 if p.swiglu_fused else 1  # gate and up tiles side by side
        gemm1 = (p.block_m + b_tiles * p.block_n) * p.block_k * p.num_stages
        gemm2 = 0
        if p.gemm2 and p.routing != "per-pair":
            gemm2 = (p.block_m + p.gemm2[0]) * p.gemm2[1] * (p.gemm2[3] if len(p.gemm2) > 3 else p.num_stages)
        return max(gemm1, gemm2) * element_size

    if len(plan.gemm2) > 3 and need(plan) > SHARED_MEMORY_BUDGET:  # GEMM2 then follows the plan's stages
        plan = replace(plan, gemm2=plan.gemm2[:3])
    while need(plan) > SHARED_MEMORY_BUDGET and plan.num_stages > 2:
        plan = replace(plan, num_stages=plan.num_stages - 1)
    while need(plan) > SHARED_MEMORY_BUDGET and plan.block_k > 32:
        plan = replace(plan, block_k=plan.block_k // 2)
    return plan


def for_interpreter(plan: MoePlan) -> MoePlan:
    """The same path with wider GEMV tiles, for Triton's interpreter on the CPU: it pays per
    program, and the GPU's 2-column GEMM2 tiles make it ~10x slower than the scan path (a
    qwen3-moe-tiny step, 8 tokens: 4.8 s vs 0.6 s with these)."""
    if plan.routing != "per-pair":
        return plan
    from dataclasses import replace

    return replace(plan, block_n=64, block_k=64, gemm2=(32, 64, 4))
