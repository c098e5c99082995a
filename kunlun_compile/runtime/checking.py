"""The replay checker (`check_replays=True`): proof at run time that replays compute what plain code does.

For one call through a plan it
- runs every captured piece a second time as plain code on the same inputs (a shadow run) and compares
  the outputs: a capture that computes something else (stale parameters, a missed input) is named;
- keeps a copy of every value crossing pieces, taken when its piece made it, and before each later piece
  and at the end checks that the value still holds it, bit for bit: memory rewritten by another replay
  while the value was live is named with the piece that ran last.

Mismatches raise `ReplayCheckError`, which the fallbacks let through: a check the user asked for must
not be turned into a silent fallback.  Given a `findings` list instead (`kunlun-compile align` and
`bisect` do), every comparison is appended to it as a row and nothing raises.  The cost is a second run of
every captured piece and one copy and one comparison per crossing value: a debugging mode, off by default.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .splitting import Piece

# Shadow runs may differ from the replay by reduction order (atomics in scatter-adds): relative error
# of the whole tensor, far below what a wrong input or parameter produces.
SHADOW_TOLERANCE = 1e-2


class ReplayCheckError(RuntimeError):
    pass


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64; inf when NaNs differ in position."""
    if got.shape != want.shape:
        return float("inf")
    if not got.is_floating_point():
        return 0.0 if torch.equal(got, want) else float("inf")
    g, w = got.double(), want.double()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return float("inf")
    g, w = torch.nan_to_num(g), torch.nan_to_num(w)
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # NaN == NaN here: a value that held NaN and still does is unchanged
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    return torch.equal(a, b)


class ReplayChecker:
    def __init__(self, graph: str, findings: Optional[List[Dict[str, Any]]] = None):
        self.graph = graph
        self.findings = findings
        self.held: Dict[str, Tuple[torch.Tensor, torch.Tensor, int]] = {}  # name -> (live, copy, piece)
        self.last_piece: Optional[Piece] = None

    def before(self, piece: Piece, args: Sequence[Any]) -> None:
        self._verify_held(f"before piece {piece.index}")

    def after(self, piece: Piece, args: Sequence[Any], outs: Sequence[Any], captured: bool) -> None:
        self.last_piece = piece
        if captured:
            shadow = piece.gm(*args)
            for name, got, want in zip(piece.outputs, outs, shadow):
                if isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor):
                    err = relative_error(got, want)
                    self._report(piece.index, name, "replay vs the piece as plain code", err, err <= SHADOW_TOLERANCE,
                                 f"kunlun backend: {self.graph} piece {piece.index}: the replay's value {name} "
                                 f"differs from the piece run as plain code on the same inputs (relative error "
                                 f"{err:.3g})")
        for name, value in zip(piece.outputs, outs):
            if isinstance(value, torch.Tensor):
                self.held[name] = (value, value.clone(), piece.index)

    def finish(self, outputs: List[Any]) -> None:
        self._verify_held("at the end of the call")

    def _verify_held(self, when: str) -> None:
        for name, (live, copy, producer) in list(self.held.items()):
            if not same_bits(live, copy):
                culprit = self.last_piece.index if self.last_piece is not None else -1
                self._report(culprit, name, f"made by piece {producer}, overwritten {when}", relative_error(live, copy),
                             False, f"kunlun backend: {self.graph}: value {name} (made by piece {producer}) was "
                                    f"overwritten {when}; the last piece run was piece {culprit}")
                del self.held[name]  # reported once

    def _report(self, piece: int, value: str, check: str, err: float, ok: bool, message: str) -> None:
        if self.findings is None:
            if not ok:
                raise ReplayCheckError(message)
            return
        self.findings.append({"graph": self.graph, "piece": piece, "value": value, "check": check,
                              "rel_err": err, "ok": ok})
