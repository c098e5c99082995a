"""kunlun::grouped_mm — the primitive "one matmul per expert group" that model code spells as
`torch._grouped_mm` (bf16), `torch.nn.functional.grouped_mm`, or HF transformers' own fallback op.

    out[offs[g-1]:offs[g]] = a[offs[g-1]:offs[g]] @ b[g]      (offs: cumulative row ends, int32)

Rows at or past offs[-1] are zero.  It exists so the expert-dispatch rules can be written once, in any
float dtype (`aten._grouped_mm`'s meta function takes bf16 only); the rules list the ops it stands for
(`ALIASES`), so a graph never needs to contain it.  Called directly it runs its reference: one matmul per
group, which reads `offs` on the host.
"""
from __future__ import annotations

import torch

# the ops this primitive stands for in the patterns that use it, as "namespace::name" (resolved when
# a pattern is built: the transformers op exists only once transformers registered it)
ALIASES = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")


def check_args(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 3:
        raise ValueError(f"grouped_mm: a must be [rows, K] and b [groups, K, N]; got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_mm: a's K {a.shape[1]} != b's K {b.shape[1]}")
    if offs.dim() != 1 or offs.shape[0] != b.shape[0] or offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_mm: offs must be int32/int64 [{b.shape[0]}], got {offs.dtype} {tuple(offs.shape)}")


def reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for g, end in enumerate(offs.tolist()):
        end = min(int(end), a.shape[0])
        if end > start:
            out[start:end] = a[start:end] @ b[g]
        start = max(start, end)
    return out


@torch.library.custom_op("kunlun::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    check_args(a, b, offs)
    return reference(a, b, offs)


@grouped_mm.register_fake
def _(a, b, offs):
    check_args(a, b, offs)
    return a.new_empty(a.shape[0], b.shape[2])
