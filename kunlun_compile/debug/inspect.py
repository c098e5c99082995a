"""A backend that keeps what the CLI's verbs need to look at: each graph as received (before the
passes), as compiled (after them), and the real arguments of its first call."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional

import torch.fx as fx

from ..backend import KunlunBackend
from ..report import GraphReport
from ..utils import copy_graph_module


@dataclasses.dataclass
class KeptGraph:
    name: str
    before: fx.GraphModule  # the ATen graph the passes received
    after: Optional[fx.GraphModule] = None  # what they produced
    args: Optional[List[Any]] = None  # the first call's arguments (parameters included)


class InspectingBackend(KunlunBackend):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.kept: List[KeptGraph] = []

    def _compile_aten(self, name: str, gm: fx.GraphModule, example_inputs, real_inputs=None) -> Callable:
        kept = KeptGraph(name, copy_graph_module(gm))
        self.kept.append(kept)
        run = super()._compile_aten(name, gm, example_inputs, real_inputs)

        def first_call_kept(*args):
            if kept.args is None:
                kept.args = list(args)
            return run(*args)
        return first_call_kept

    def _runtime(self, name: str, gm: fx.GraphModule, example_inputs, report: GraphReport) -> Callable:
        self.kept[-1].after = gm
        return super()._runtime(name, gm, example_inputs, report)
