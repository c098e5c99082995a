"""Index expressions of a generated kernel: which element of an input a point of the iteration space reads.

An expression is affine in *atoms* with integer coefficients: the kernel's coordinates `c{d}`, SSA
values (`v{n}`: gathered ids, loaded by the kernel) and floor-divisions / remainders of affine
expressions by a constant (what a reshape leaves).  Views of values computed in a kernel (slice,
transpose, reshape, expand, select), `cat` branches and gathers (`index_select`, embedding, `x[ids]`)
are all such maps from the kernel's point to a producer's coordinates.

Construction simplifies with what is known of each atom's range (a coordinate lies in
[0, size - 1] when the size is static): `(a*k + b) // k` with b in [0, k) is `a`, and `% k` of it
is `b`, so the maps a reshape and its inverse compose to plain coordinates again.  Expressions are
hashable (memo keys), serialise to JSON lists (no eval on load), and print as Triton code.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

Range = Tuple[Optional[int], Optional[int]]  # inclusive bounds; None: unbounded


@dataclasses.dataclass(frozen=True)
class Atom:
    kind: str  # "c" coordinate, "v" SSA value, "//" or "%" of `inner` by `k`
    n: int = 0  # coordinate dim or SSA id; the constant k for "//" and "%"
    inner: Optional["Affine"] = None

    def code(self) -> str:
        if self.kind == "c":
            return f"c{self.n}"
        if self.kind == "v":
            return f"v{self.n}"
        return f"(({self.inner.code()}) {self.kind} {self.n})"

    def to_json(self) -> list:
        return [self.kind, self.n] + ([self.inner.to_json()] if self.inner is not None else [])


@dataclasses.dataclass(frozen=True)
class Affine:
    terms: Tuple[Tuple[Atom, int], ...] = ()  # sorted by atom, coefficients non-zero
    const: int = 0

    # ---- construction ------------------------------------------------------------------------
    @staticmethod
    def coord(d: int) -> "Affine":
        return Affine(((Atom("c", d), 1),))

    @staticmethod
    def value(n: int) -> "Affine":
        return Affine(((Atom("v", n), 1),))

    @staticmethod
    def constant(k: int) -> "Affine":
        return Affine((), int(k))

    def __add__(self, other) -> "Affine":
        other = other if isinstance(other, Affine) else Affine.constant(other)
        acc: Dict[Atom, int] = dict(self.terms)
        for atom, k in other.terms:
            acc[atom] = acc.get(atom, 0) + k
        return Affine(_normal(acc), self.const + other.const)

    def __sub__(self, other) -> "Affine":
        other = other if isinstance(other, Affine) else Affine.constant(other)
        return self + other * -1

    def __mul__(self, k: int) -> "Affine":
        k = int(k)
        if k == 0:
            return Affine.constant(0)
        return Affine(tuple((a, c * k) for a, c in self.terms), self.const * k)

    def floordiv(self, k: int, sizes: Sequence[Optional[int]]) -> "Affine":
        """self // k (k > 0) for coordinates in [0, sizes[d])."""
        whole, rest = self._split(k)
        lo, hi = rest.range(sizes)
        if lo is not None and hi is not None and 0 <= lo and hi < k:
            return whole
        if rest.const == 0 and not rest.terms:
            return whole
        return whole + Affine(((Atom("//", k, rest), 1),))

    def mod(self, k: int, sizes: Sequence[Optional[int]]) -> "Affine":
        """self % k (k > 0) for coordinates in [0, sizes[d])."""
        _, rest = self._split(k)
        lo, hi = rest.range(sizes)
        if lo is not None and hi is not None and 0 <= lo and hi < k:
            return rest
        return Affine(((Atom("%", k, rest), 1),))

    def _split(self, k: int) -> Tuple["Affine", "Affine"]:
        """(q, r) with self = q*k + r: the terms whose coefficients k divides go to q."""
        q = tuple((a, c // k) for a, c in self.terms if c % k == 0)
        r = tuple((a, c) for a, c in self.terms if c % k != 0)
        return Affine(q, self.const // k), Affine(r, self.const % k)

    # ---- questions ---------------------------------------------------------------------------
    def is_coord(self, d: int) -> bool:
        return self.const == 0 and self.terms == ((Atom("c", d), 1),)

    @property
    def is_constant(self) -> bool:
        return not self.terms

    def values(self) -> Tuple[int, ...]:
        """The SSA values the expression reads."""
        out = []
        for atom, _ in self.terms:
            if atom.kind == "v":
                out.append(atom.n)
            elif atom.inner is not None:
                out += atom.inner.values()
        return tuple(out)

    def range(self, sizes: Sequence[Optional[int]]) -> Range:
        lo, hi = self.const, self.const
        for atom, c in self.terms:
            alo, ahi = _atom_range(atom, sizes)
            a, b = (alo, ahi) if c > 0 else (ahi, alo)
            lo = None if lo is None or a is None else lo + c * a
            hi = None if hi is None or b is None else hi + c * b
        return lo, hi

    # ---- text and JSON -----------------------------------------------------------------------
    def code(self) -> str:
        parts = [(a.code() if c == 1 else f"{a.code()} * {c}") for a, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts)

    def to_json(self) -> list:
        return [self.const, [[a.to_json(), c] for a, c in self.terms]]

    @staticmethod
    def from_json(d: list) -> "Affine":
        const, terms = d
        return Affine(tuple((_atom_from_json(a), int(c)) for a, c in terms), int(const))


def _atom_from_json(d: list) -> Atom:
    kind, n = d[0], int(d[1])
    if kind not in ("c", "v", "//", "%"):
        raise ValueError(f"index expression: unknown atom {kind!r}")
    return Atom(kind, n, Affine.from_json(d[2]) if len(d) > 2 else None)


def _normal(acc: Dict[Atom, int]) -> Tuple[Tuple[Atom, int], ...]:
    return tuple(sorted(((a, c) for a, c in acc.items() if c), key=lambda t: repr(t[0])))


def _atom_range(atom: Atom, sizes: Sequence[Optional[int]]) -> Range:
    if atom.kind == "c":
        size = sizes[atom.n] if atom.n < len(sizes) else None
        return 0, (size - 1 if isinstance(size, int) else None)
    if atom.kind == "v":
        return None, None
    if atom.kind == "%":
        return 0, atom.n - 1
    lo, hi = atom.inner.range(sizes)
    return (None if lo is None else lo // atom.n), (None if hi is None else hi // atom.n)


def identity(rank: int) -> Tuple[Affine, ...]:
    return tuple(Affine.coord(d) for d in range(rank))
