"""Fusion passes: one pass per pattern family, each applying its rewrite rules.

Order matters and is the order of `FAMILIES`: the attention prologue goes
before the norms (its Q/K norms would otherwise be taken as lone RMSNorms), and
the MoE router before the experts (the experts' rule reads the router's ids), and
linear layers last (other patterns may start at a projection's output).

A family runs its stages in order.  Most have one: whole-subgraph rules that fuse.  The attention prologue,
the norms, the router, the experts and the gated linears have the two-stage form: every spelling becomes a
primitive (`kunlun::rotary`, `kunlun::rmsnorm_primitive`, `kunlun::router`, `kunlun::experts`,
`kunlun::act_and_mul`: rules that fuse nothing by themselves), fusing rules take primitives (chains of them into
the prologue kernels; an add and a norm into one kernel; a router or the experts into their kernels; a gated
product into the projection it feeds), and the primitives left are put back as their reference.  The norms are
recognised first in the prologue's family
(its Q/K norms are primitives to its rules) and fused or put back in their own.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import torch.fx as fx

from .cleanup import fold_cast_round_trips
from .explain import unfused_anchors
from .layouts import RELAID
from .manager import GraphPass, PassContext, PassOutcome
from .pattern_engine import Rewrite, apply_rewrites
from .rules import (activations, hf_prologue, linears, mask_terms, masks, moe_experts, moe_gate, norms, prologue,
                    rotary)


@dataclasses.dataclass(frozen=True)
class Stage:
    rules: Sequence[Rewrite]
    fuses: bool = True  # False: its rewrites make or remove primitives, and are not counted as fusions
    # its replacements may lay their results out unlike the nodes they replaced (a primitive put back as its
    # reference): they are marked for `layouts.py`, which makes the views after them reshapes
    relays: bool = False
    then: Optional[Callable[[fx.GraphModule], int]] = None  # a graph tidy-up after the rules
    notes: Optional[Callable[[fx.GraphModule], List[str]]] = None  # near misses read off the graph before them
    # whose rules `explain` compares an anchor left in the graph with (None: the fusing stages'); a family whose
    # fusing rules match primitives only explains with the rules that make them
    explains: Optional[bool] = None
    quiet: bool = False  # its near misses are left to the family whose rules these are (it runs them again)
    # runs only where this says so (None: always); e.g. put back another family's primitives when it is off
    when: Optional[Callable[[PassContext], bool]] = None
    # a recogniser that reads the graph instead of matching traced patterns (its rules are then empty)
    reads: Optional[Callable[[fx.GraphModule], PassOutcome]] = None

    @property
    def explaining(self) -> bool:
        return self.fuses if self.explains is None else self.explains


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # the pattern family, as reports count it
    description: str
    stages: Sequence[Stage]

    @property
    def rules(self) -> List[Rewrite]:
        """Its own rules (a stage may run another family's: the prologue recognises norms first)."""
        return [r for s in self.stages for r in s.rules if r.family == self.name]


def _fusing(rules: Sequence[Rewrite]) -> Sequence[Stage]:
    return (Stage(rules),)


# The one list of pattern families, in pass order.
FAMILIES = (
    Family("masked_input", "vocab-shard id masking -> kunlun::masked_input", _fusing(masks.MASKED_INPUT_RULES)),
    Family("attention_mask", "causal / sliding-window / padding mask construction -> kunlun::attention_mask; "
           "any conjunction of causal, window and padding terms over index grids (HF's masking_utils) -> the same",
           (Stage(masks.ATTENTION_MASK_RULES), Stage((), reads=mask_terms.recognise))),
    Family("norm_rope_gate", "qkv(+gate) split + Q/K RMSNorm + rotary -> kunlun::split_norm_rope_gate; "
           "separate q/k projections (HF) + Q/K RMSNorm + rotary primitives -> kunlun::qk_norm_rope",
           (Stage(norms.RECOGNISE, fuses=False, relays=True, quiet=True),
            Stage(rotary.RECOGNISE, fuses=False, then=rotary.share_tables),
            Stage(rotary.WIDEN, fuses=False),
            Stage(prologue.RULES),
            Stage(hf_prologue.RULES, then=hf_prologue.tidy),
            Stage(rotary.LOWER, fuses=False, relays=True, notes=rotary.unfused),
            Stage(norms.LOWER, fuses=False, relays=True, when=lambda ctx: not ctx.config.is_enabled("add_rmsnorm")))),
    Family("moe_gate", "router softmax/sigmoid + (grouped) top-k + renormalise + scale -> kunlun::router primitive "
           "-> kunlun::moe_gate",
           (Stage(moe_gate.RECOGNISE, fuses=False, explains=True),
            Stage(moe_gate.WIDEN, fuses=False),
            Stage(moe_gate.FUSE, explains=False, then=fold_cast_round_trips),
            Stage(moe_gate.LOWER, fuses=False, relays=True, notes=moe_gate.unfused))),
    Family("moe_ffn", "routed experts in any spelling (gather, HF batched_mm / grouped_mm, sorted dispatch over "
           "torch._grouped_mm) -> kunlun::experts primitive -> kunlun::fused_moe",
           (Stage(moe_experts.RECOGNISE, fuses=False, explains=True),
            Stage(moe_experts.FUSE, explains=False),
            Stage(moe_experts.LOWER, fuses=False, relays=True, notes=moe_experts.unfused))),
    Family("add_rmsnorm", "RMSNorm in any spelling -> kunlun::rmsnorm_primitive; with the residual add before it "
           "-> kunlun::fused_add_rmsnorm; alone -> kunlun::rms_norm",
           (Stage(norms.RECOGNISE, fuses=False, relays=True, explains=True),
            Stage(norms.FUSE),
            Stage(norms.LOWER, fuses=False, relays=True, notes=norms.unfused))),
    Family("decode_linear", "linear layer x @ w.T (+ b) -> kunlun::linear (a GEMV at decode rows, cuBLAS above); "
           "act(gate) * up in any spelling -> kunlun::act_and_mul primitive; with it as the input (SwiGLU, "
           "attention gate) and a gated residual -> kunlun::gated_linear",
           (Stage(activations.RECOGNISE, fuses=False),
            Stage(linears.RULES),
            Stage(activations.LOWER, fuses=False, relays=True, notes=activations.unfused))),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)
# each family's stages, read when the passes are built (tests swap a family's stages here to plant faults)
FAMILY_STAGES = {f.name: f.stages for f in FAMILIES}
FAMILY_RULES = {f.name: f.rules for f in FAMILIES}  # every rule of a family, for explain and the rule tests


def _family_pass(family: str, stages: Sequence[Stage]):
    def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
        outcome = PassOutcome()
        for stage in stages:
            if stage.when is not None and not stage.when(ctx):
                continue
            # by name: a rewrite that breaks the graph's order has it rebuilt (`legalize_graph`), new node objects
            before = {n.name for n in gm.graph.nodes} if stage.relays else None
            noted = stage.notes(gm) if stage.notes is not None else []
            done = stage.reads(gm) if stage.reads is not None else apply_rewrites(gm, stage.rules, fuses=stage.fuses)
            if stage.then is not None and done.matches:
                stage.then(gm)
            for node in gm.graph.nodes if before is not None else ():
                if node.name not in before:
                    node.meta[RELAID] = True
            if stage.fuses:
                outcome.matches += done.matches
                for name, n in done.patterns.items():
                    outcome.patterns[name] = outcome.patterns.get(name, 0) + n
            found = ([] if stage.quiet else done.near_misses) + noted
            outcome.near_misses += [line for line in found if line not in outcome.near_misses]
        rules = [r for s in stages if s.explaining for r in s.rules]
        outcome.near_misses += [line for line in unfused_anchors(gm, family, rules) if line not in outcome.near_misses]
        return outcome
    return run


def fusion_passes() -> List[GraphPass]:
    return [GraphPass(f.name, f.description, _family_pass(f.name, FAMILY_STAGES[f.name]), family=True)
            for f in FAMILIES]
