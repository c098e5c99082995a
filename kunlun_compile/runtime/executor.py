"""Run one compiled graph; if it fails, run the uncompiled ATen graph instead.

Graphs are functional (AOTAutograd applies input mutations after we return),
so re-running the same inputs through the fallback graph is safe: nothing the
failed attempt did is visible to the caller.
"""
from __future__ import annotations

from typing import Callable, Optional, Set

import torch.fx as fx

from ..report import Fallback, GraphReport
from ..utils import warn_once


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

    def __call__(self, *args):
        if self.failed:
            return self.fallback(*args)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - a kernel failure must not break the user's model
            if self.strict:
                raise
            reason = f"{type(e).__name__}: {e}"
            warn_once(f"kunlun backend: compiled graph {self.name} failed at run time and now runs "
                      f"uncompiled: {reason}", self.warned)
            if self.report is not None:
                self.report.fallbacks.append(Fallback(self.name, "runtime", reason))
            self.failed = True
            return self.fallback(*args)
