"""Fusion passes: one pass per pattern family, each applying its rewrite rules.

Order matters and is the order of `FAMILIES`: the attention prologue goes
before the norms (its Q/K norms would otherwise be taken as lone RMSNorms), and
the MoE router before the experts (the experts' rule reads the router's ids), and
linear layers last (other patterns may start at a projection's output).
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

import torch.fx as fx

from .explain import unfused_anchors
from .manager import GraphPass, PassContext, PassOutcome
from .pattern_engine import Rewrite, apply_rewrites
from .rules import hf_prologue, linears, masks, moe_experts, moe_gate, norms, prologue



@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the pattern family, as reports count it
    description: str
    rules: Sequence[Rewrite]


# The one list of pattern families, in pass order.
FAMILIES = (
    Family("masked_input", "vocab-shard id masking -> kunlun::masked_input", masks.MASKED_INPUT_RULES),
    Family("attention_mask", "causal / sliding-window / padding mask construction -> kunlun::attention_mask",
           masks.ATTENTION_MASK_RULES),
    Family("norm_rope_gate", "qkv(+gate) split + Q/K RMSNorm + rotary -> kunlun::split_norm_rope_gate; "
           "separate q/k projections (HF) + Q/K RMSNorm + rotary -> kunlun::qk_norm_rope",
           prologue.RULES + hf_prologue.RULES),
    Family("moe_gate", "router softmax/sigmoid + (grouped) top-k + renormalise -> kunlun::moe_gate", moe_gate.RULES),
    Family("moe_ffn", "routed expert FFN -> kunlun::fused_moe", moe_experts.RULES),
    Family("add_rmsnorm", "residual add + RMSNorm -> kunlun::fused_add_rmsnorm; lone RMSNorm -> kunlun::rms_norm",
           norms.RULES),
    Family("decode_linear", "linear layer x @ w.T (+ b) -> kunlun::linear (a GEMV at decode rows, cuBLAS above); "
           "with a gated input (SwiGLU, attention gate) and gated residual -> kunlun::gated_linear", linears.RULES),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)
# each family's rules, read when the passes are built (tests swap a family's rules here to plant faults)
FAMILY_RULES = {f.name: f.rules for f in FAMILIES}


def _family_pass(family: str, rules: Sequence[Rewrite]):
    def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
        outcome = apply_rewrites(gm, rules)
        outcome.near_misses += [line for line in unfused_anchors(gm, family, rules) if line not in outcome.near_misses]
        return outcome
    return run


def fusion_passes() -> List[GraphPass]:
    return [GraphPass(f.name, f.description, _family_pass(f.name, FAMILY_RULES[f.name]), family=True)
            for f in FAMILIES]
