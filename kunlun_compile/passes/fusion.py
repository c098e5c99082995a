"""Fusion passes: one pass per pattern family, each applying its rewrite rules.

Order matters and is fixed by `FUSION_ORDER`: the attention prologue goes
before the norms (its Q/K norms would otherwise be taken as lone RMSNorms), and
the MoE router before the experts (the experts' rule reads the router's ids), and
linear layers last (other patterns may start at a projection's output).
"""
from __future__ import annotations

from typing import List, Sequence

import torch.fx as fx

from .manager import GraphPass, PassContext, PassOutcome
from .pattern_engine import Rewrite, apply_rewrites
from .rules import hf_prologue, linears, masks, moe_experts, moe_gate, norms, prologue

FAMILY_RULES = {
    "masked_input": masks.MASKED_INPUT_RULES,
    "attention_mask": masks.ATTENTION_MASK_RULES,
    "norm_rope_gate": prologue.RULES + hf_prologue.RULES,
    "moe_gate": moe_gate.RULES,
    "moe_ffn": moe_experts.RULES,
    "add_rmsnorm": norms.RULES,
    "decode_linear": linears.RULES,
}
DESCRIPTIONS = {
    "masked_input": "vocab-shard id masking -> kunlun::masked_input",
    "attention_mask": "causal / sliding-window / padding mask construction -> kunlun::attention_mask",
    "norm_rope_gate": "qkv(+gate) split + Q/K RMSNorm + rotary -> kunlun::split_norm_rope_gate; "
                      "separate q/k projections (HF) + Q/K RMSNorm + rotary -> kunlun::qk_norm_rope",
    "moe_gate": "router softmax/sigmoid + (grouped) top-k + renormalise -> kunlun::moe_gate",
    "moe_ffn": "routed expert FFN -> kunlun::fused_moe",
    "add_rmsnorm": "residual add + RMSNorm -> kunlun::fused_add_rmsnorm; lone RMSNorm -> kunlun::rms_norm",
    "decode_linear": "linear layer x @ w.T (+ b) -> kunlun::linear (a GEMV at decode rows, cuBLAS above); "
                     "with a gated input (SwiGLU, attention gate) and gated residual -> kunlun::gated_linear",
}


def _family_pass(rules: Sequence[Rewrite]):
    def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
        result = apply_rewrites(gm, rules)
        return PassOutcome(result.matches, result.patterns, result.near_misses)
    return run


def fusion_passes() -> List[GraphPass]:
    return [GraphPass(family, DESCRIPTIONS[family], _family_pass(rules)) for family, rules in FAMILY_RULES.items()]
