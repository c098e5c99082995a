"""Capture sets: which captures a call may replay.

A capture set is one way of running a graph (its plan: piecewise or full), one size the captured
pieces run at, and the parameters the call passes (their addresses).  Every piece of a set is warmed
up, captured and replayed in the same calls, in graph order:

- Parameters are read in place by the captures, so a capture made with one set of weights must never
  replay for another.  Dynamo reuses one compiled graph for every layer when each layer has a graph
  break in it (the layer's weights become inputs): each layer is a set of its own.
- All captures of a graph share one memory pool.  A capture allocates its outputs in memory that was
  free at the time — possibly another capture's scratch space, which that capture rewrites on every
  replay.  Captured in one call in graph order, a set's pieces can only reuse the scratch of pieces
  that run before them in every call that replays them; and a call replays only its own set.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..utils import warn_once
from .capture import CAPTURE, REPLAY, WARM_UP

# Distinct parameter sets per size (one per layer when a graph serves every layer).
MAX_PARAMETER_SETS = 256


@dataclasses.dataclass
class CaptureSet:
    id: int
    size: int
    addresses: Tuple[int, ...]
    calls: int = 0

    def next_phase(self) -> str:
        self.calls += 1
        return WARM_UP if self.calls == 1 else CAPTURE if self.calls == 2 else REPLAY


class CaptureSets:
    def __init__(self, name: str, parameter_positions: Sequence[int], max_sizes: int, warned: Set[str]):
        self.name = name
        self.positions = sorted(parameter_positions)
        # args -> the parameters, one C call (a tuple even for one position)
        self._pick = (operator.itemgetter(*self.positions) if len(self.positions) > 1 else
                      (lambda args: (args[self.positions[0]],)) if self.positions else (lambda args: ()))
        self.max_sizes = max_sizes
        self.warned = warned
        self._sets: Dict[Tuple[str, int], List[CaptureSet]] = {}
        self._count = 0

    def lookup(self, plan: str, size: int, args: Sequence[Any]) -> Optional[CaptureSet]:
        """The set this call belongs to (made on first sight), or None: run without graphs."""
        key = (plan, size)
        sets = self._sets.get(key)
        if sets is None:
            if sum(1 for p, _ in self._sets if p == plan) >= self.max_sizes:
                warn_once(f"kunlun backend: {self.name} reached max_captures_per_piece={self.max_sizes}; "
                          "sizes not captured yet run without a graph", self.warned)
                return None
            sets = self._sets[key] = []
        # addresses, not tensor identity: `param.data = ...` moves a parameter and keeps the object
        try:
            addresses = tuple(map(torch.Tensor.data_ptr, self._pick(args)))
        except TypeError:  # a non-tensor among them (a SymInt Dynamo counted as static)
            addresses = tuple(map(_address, self._pick(args)))
        for s in sets:
            if s.addresses == addresses:
                return s
        if len(sets) >= MAX_PARAMETER_SETS:
            warn_once(f"kunlun backend: {self.name} is called with more than {MAX_PARAMETER_SETS} parameter "
                      "sets at one size; further sets run without a graph", self.warned)
            return None
        new = CaptureSet(self._count, size, addresses)
        self._count += 1
        sets.append(new)
        return new

    def __len__(self) -> int:
        return self._count


def _address(value: Any) -> int:
    return value.data_ptr() if isinstance(value, torch.Tensor) else id(value)
