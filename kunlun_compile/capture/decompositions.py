"""The one fixed decomposition table the backend captures with.

Kept small on purpose: the fusion patterns and the element-wise lowering see
the ATen ops listed in their own tables (silu, gelu, sigmoid, rsqrt...), so
those must survive capture whole.  We decompose only ops that appear in more
than one spelling, so that each computation reaches the passes in one form.
"""
from __future__ import annotations

import functools
from typing import Dict

import torch
from torch._decomp import get_decompositions

aten = torch.ops.aten

# op -> why it is decomposed
DECOMPOSED_OPS = {
    aten.rms_norm: "F.rms_norm and hand-written RMSNorm must look the same to add_rmsnorm",
    aten._fused_rms_norm: "the fused CPU/CUDA rms_norm kernel op; same reason as rms_norm",
    aten.addcmul: "rare; mul+add is what the lowering and the patterns know",
    aten.addcdiv: "rare; div+add is what the lowering and the patterns know",
    aten.lerp: "lowered as sub/mul/add",
    aten.softplus: "lowered through exp/log1p",
    aten.hardsigmoid: "lowered as clamp arithmetic",
    aten.hardswish: "lowered as clamp arithmetic",
    aten.hardtanh: "a clamp",
    aten.elu: "lowered through expm1/where",
    aten.glu: "split + sigmoid + mul",
}


@functools.lru_cache(maxsize=None)
def _table() -> Dict:
    return get_decompositions(list(DECOMPOSED_OPS))


def decomposition_table() -> dict:
    """A copy of the table (built once: each build walks torch's registry, ~4 ms, and every pattern
    trace asks for it)."""
    return dict(_table())
