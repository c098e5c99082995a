"""Small targets for the CLI tests (`kunlun-compile VERB tests/planted_models.py:FACTORY`), and
deliberately broken rewrites that `bisect` and `align` must find."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kunlun_compile.models.layers import RMSNorm
from kunlun_compile.passes.rules import norms

BROKEN_EPS = 1e-5  # the planted bug fires only on the norm with this eps


class TwoNorms(nn.Module):
    """Three residual RMSNorms (vLLM form) with linears between; only the second has eps 1e-5."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norms = nn.ModuleList([RMSNorm(dim, 1e-6), RMSNorm(dim, BROKEN_EPS), RMSNorm(dim, 1e-6)])
        self.linears = nn.ModuleList([nn.Linear(dim, dim) for _ in range(3)])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        for norm, linear in zip(self.norms, self.linears):
            h, residual = norm(x, residual)
            x = torch.nn.functional.silu(linear(h))
        return x + residual


def two_norms():
    torch.manual_seed(0)
    return TwoNorms(), (torch.randn(6, 32), torch.randn(6, 32))


def _plant_broken_add_rmsnorm() -> None:
    """The residual add+RMSNorm rule's replacement scales the normalised output by 1.5 when eps is
    BROKEN_EPS: a wrong rewrite of one match out of three (in float32 the norm is a primitive by then)."""
    from kunlun_compile.passes import fusion

    index = next(i for i, r in enumerate(norms.FUSE) if r.name == "add_rmsnorm")
    rule = norms.FUSE[index]

    def broken(*tensors, **params):
        out, residual = rule.replace(*tensors, **params)
        return (out * 1.5 if abs(params.get("eps", 0) - BROKEN_EPS) < 1e-9 else out), residual

    fuse = list(norms.FUSE)
    fuse[index] = dataclasses.replace(rule, replace=broken)
    fusion.FAMILY_STAGES["add_rmsnorm"] = tuple(dataclasses.replace(s, rules=fuse) if s.rules is norms.FUSE else s
                                                for s in fusion.FAMILY_STAGES["add_rmsnorm"])


def two_norms_broken():
    _plant_broken_add_rmsnorm()
    return two_norms()


class EscapingNorm(nn.Module):
    """An RMSNorm whose mean square is also returned: fusing would compute it twice (a near miss)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor):
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        return x * torch.rsqrt(variance + 1e-6) * self.weight, variance


def escaping_norm():
    torch.manual_seed(0)
    return EscapingNorm(), (torch.randn(6, 32),)
