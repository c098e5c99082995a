"""Division by a run-time size as a high multiply and a shift: splitting a flat index into coordinates.

A generated kernel takes its sizes at run time (one compile serves every token count), so `i % n`
and `i // n` would be a full integer division per element (~20 instructions).  For a divisor d and
every 0 <= i < 2**31, with l = ceil(log2 d) and m = ceil(2**(31 + l) / d) (< 2**32):
i // d == (i * m) >> (31 + l) == umulhi(2 * i, m) >> l, exactly (Granlund & Montgomery:
2**(31+l) <= m*d < 2**(31+l) + 2**l).  2*i < 2**32 and m fit 32 unsigned bits, so the kernel needs
one 32-bit high multiply and one shift.  m travels as the int32 of its bits (a Python int >= 2**31
would make the argument int64).  Kernels whose indices need int64 keep the division.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple


def magic(d: int) -> Tuple[int, int]:
    """(m, l) with i // d == (i * m) >> (31 + l) for 0 <= i < 2**31; m < 2**32."""
    d = max(int(d), 1)  # a size-0 dim launches nothing
    lg = (d - 1).bit_length()
    return -(-(1 << (31 + lg)) // d), lg


def size_args(sizes: Sequence[int]) -> List[int]:
    """The kernel's `size{d}, mg{d}, sh{d}` arguments for the dims after the first."""
    out: List[int] = []
    for d in sizes:
        m, lg = magic(d)
        out += [int(d), m - (1 << 32) if m >= 1 << 31 else m, lg]
    return out


def size_params(first: int, last: int) -> List[str]:
    return [f"{p}{d}" for d in range(first, last) for p in ("size", "mg", "sh")]


def split_lines(d: int, rem: str = "rem") -> List[str]:
    """Source lines: `c{d}` = rem mod size{d}, then rem = rem div size{d}."""
    return ["if INDEX64:",
            f"    q{d} = {rem} // size{d}",
            "else:",
            f"    q{d} = (tl.umulhi({rem} * 2, mg{d}).to(tl.uint32, bitcast=True) >> sh{d}).to(tl.int32, bitcast=True)",
            f"c{d} = {rem} - q{d} * size{d}",
            f"{rem} = q{d}"]
