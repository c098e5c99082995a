"""kunlun::rotary — the primitive "rotate the first `rotary_dim` dims of each row by the angles in cos/sin"
that model code spells in many ways (HF `rotate_half`, pairs stacked and flattened, halves without `-x2`,
half-width tables, the rotation in float32 on an upcast x, partial rotary by slice and `cat`).  The rotary
rules (`passes/rules/rotary.py`) turn each spelling into this one node; the prologue rules fuse it with its
Q/K norm; whatever is left is put back as its reference, so a graph never keeps it.

    r = x[..., :rotary_dim]                  (cos, sin: full width rotary_dim, broadcast against r)
    neox:   rot(r) = cat(-r[..., h:], r[..., :h])           (h = rotary_dim / 2)
    pairs:  rot(r) = stack(-r[..., 1::2], r[..., ::2]).flatten(-2)
    out = cat(r * cos + rot(r) * sin, x[..., rotary_dim:])

The arithmetic is HF's to the bit (`x1 cos - x2 sin` is `x1 cos + (-x2) sin` in IEEE arithmetic); the
result's dtype is the promotion of x's, cos's and sin's (a float32 table rotates a bf16 x in float32).
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def check_args(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> None:
    """Refuses what is known to be wrong, without guarding on symbolic sizes (a guard made here, inside the
    passes, names symbols Dynamo cannot source)."""
    if not (x.is_floating_point() and cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"rotary: x, cos and sin must be float, got {x.dtype}, {cos.dtype}, {sin.dtype}")
    if not (0 < rotary_dim and rotary_dim % 2 == 0 and not _known(rotary_dim > x.shape[-1])):
        raise ValueError(f"rotary: rotary_dim {rotary_dim} must be even and in (0, {x.shape[-1]}]")
    if (cos.dim() != sin.dim() or cos.dim() > x.dim() or any(_known(a != b) for a, b in zip(cos.shape, sin.shape))
            or _known(cos.shape[-1] != rotary_dim)):
        raise ValueError(f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be equal tables of width "
                         f"{rotary_dim} with at most x's {x.dim()} dims")
    lead = x.shape[x.dim() - cos.dim():-1]
    if any(_known(c != 1) and _known(c != s) for c, s in zip(cos.shape[:-1], lead)):
        raise ValueError(f"rotary: cos {tuple(cos.shape)} does not broadcast against x {tuple(x.shape)} "
                         "without growing it")


def _known(condition) -> bool:
    return bool(statically_known_true(condition))


def rotate(r: torch.Tensor, neox: bool) -> torch.Tensor:
    if neox:
        half = r.shape[-1] // 2
        return torch.cat((-r[..., half:], r[..., :half]), dim=-1)
    return torch.stack((-r[..., 1::2], r[..., ::2]), dim=-1).flatten(-2)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool, rotary_dim: int) -> torch.Tensor:
    r = x[..., :rotary_dim]
    out = r * cos + rotate(r, neox) * sin
    if isinstance(x.shape[-1], int) and rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:].to(out.dtype)), dim=-1)


@torch.library.custom_op("kunlun::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool, rotary_dim: int) -> torch.Tensor:
    check_args(x, cos, sin, rotary_dim)
    return reference(x, cos, sin, neox, rotary_dim).contiguous()


@rotary.register_fake
def _(x, cos, sin, neox, rotary_dim):
    check_args(x, cos, sin, rotary_dim)
    return x.new_empty(x.shape, dtype=torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype))
