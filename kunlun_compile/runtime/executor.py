"""Run one compiled graph; if it fails, run the uncompiled ATen graph instead, for that call.

Graphs are functional (AOTAutograd applies input mutations after we return),
so re-running the same inputs through the fallback graph is safe: nothing the
failed attempt did is visible to the caller.

A failure is handled per call: when the uncompiled graph fails on the same
input too, the input is bad (eager raises the same error) and the error
reaches the caller with the compiled path left on; when only the compiled
graph fails, that call runs uncompiled (one warning), and after
`MAX_CONSECUTIVE_FAILURES` such calls in a row the graph stays uncompiled.
"""
from __future__ import annotations

from typing import Callable, Optional, Set

import torch.fx as fx

from ..report import Fallback, GraphReport
from ..utils import warn_once
from .checking import ReplayCheckError

MAX_CONSECUTIVE_FAILURES = 3


class GraphExecutor:
    def __init__(self, name: str, compiled: Callable, fallback: fx.GraphModule, *, strict: bool,
                 report: Optional[GraphReport], warned: Set[str]):
        self.name = name
        self.compiled = compiled
        self.fallback = fallback
        self.strict = strict
        self.report = report
        self.warned = warned
        self.failed = False
        self.consecutive_failures = 0

    def __call__(self, *args):
        if self.failed:
            return self.fallback(*args)
        try:
            out = self.compiled(*args)
        except ReplayCheckError:
            raise  # the check the user asked for: never hidden behind a fallback
        except Exception as e:  # noqa: BLE001 - a kernel failure must not break the user's model
            if self.strict:
                raise
            out = self.fallback(*args)  # raises, as eager would, when the input itself is bad
            self._compiled_failed(f"{type(e).__name__}: {e}")
            return out
        self.consecutive_failures = 0
        return out

    def _compiled_failed(self, reason: str) -> None:
        self.consecutive_failures += 1
        self.failed = self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES
        then = "now runs uncompiled" if self.failed else "ran uncompiled for this call"
        warn_once(f"kunlun backend: compiled graph {self.name} failed at run time and {then}: {reason}",
                  self.warned)
        if self.report is not None:
            self.report.fallbacks.append(Fallback(self.name, "runtime", f"{then}: {reason}"))
