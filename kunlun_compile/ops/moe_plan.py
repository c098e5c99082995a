"""How `kunlun::fused_moe` runs a given problem: a pure function of the sizes.

The path is chosen by the number of (token, expert) pairs, M·top_k, as
vLLM-Kunlun's fused MoE does (seeds/000):
- small  (M·k < 400):  no sorting.  Each program owns one expert and scans the
  [M, k] id table for its tokens; experts nobody chose exit at once, so each
  chosen expert's weights are read once.  Latency-bound decode sizes.
- medium (400 ≤ M·k ≤ 768): pairs sorted by expert (a stable argsort) into
  blocks of one expert each, then a grouped GEMM over the blocks.
- large  (M·k > 768): per-block expert statistics (a histogram per block of
  pairs, prefix sums) give each pair its place with no comparison sort; the
  grouped GEMM runs on larger tiles.
SwiGLU is fused into the first GEMM's epilogue when M ≥ 1024 (gate and up
tiles computed by the same program); below that the first GEMM writes
gate|up and a separate pass applies SwiGLU.

`kunlun-compile` shows the plan of every fused_moe call it finds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

SMALL_MAX_PAIRS = 400  # M·k below this: small path
MEDIUM_MAX_PAIRS = 768  # M·k up to this: medium path
SWIGLU_FUSE_MIN_TOKENS = 1024


@dataclass(frozen=True)
class MoePlan:
    path: str  # "small" | "medium" | "large"
    pairs: int  # M·top_k
    routing: str  # how pairs reach their expert's program: "scan" | "argsort" | "block-histogram"
    swiglu_fused: bool
    block_m: int  # rows (pairs) per program
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        swiglu = "fused into GEMM1" if self.swiglu_fused else "separate pass"
        return (f"{self.path} path ({self.pairs} pairs), routing {self.routing}, SwiGLU {swiglu}, "
                f"tiles {self.block_m}x{self.block_n}x{self.block_k}, {self.num_warps} warps")


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan_fused_moe(num_tokens: int, top_k: int, num_experts: int) -> MoePlan:
    if num_tokens < 0 or top_k < 1 or num_experts < 1:
        raise ValueError(f"plan_fused_moe: bad sizes M={num_tokens}, top_k={top_k}, E={num_experts}")
    pairs = num_tokens * top_k
    fused = num_tokens >= SWIGLU_FUSE_MIN_TOKENS
    if pairs < SMALL_MAX_PAIRS:
        # one program per (expert, column block, chunk of tokens); tl.dot needs >= 16 rows
        block_m = min(max(_pow2_at_least(num_tokens), 16), 64)
        return MoePlan("small", pairs, "scan", fused, block_m, 64, 128, 4, 4)
    if pairs <= MEDIUM_MAX_PAIRS:
        return MoePlan("medium", pairs, "argsort", fused, 16, 64, 128, 4, 4)
    per_expert = pairs / num_experts
    block_m = 128 if per_expert >= 128 else 64 if per_expert >= 32 else 16
    block_n = 64 if fused else 128
    return MoePlan("large", pairs, "block-histogram", fused, block_m, block_n, 64, 8 if block_m == 128 else 4, 3)
