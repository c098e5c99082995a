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

from typing import Callable, List, Optional, Set

import sympy
import torch
import torch.fx as fx

from ..report import Fallback, GraphReport
from ..utils import warn_once
from .checking import ReplayCheckError
from .token_dims import SymbolBinder

aten = torch.ops.aten


class SizeAssumptionBroken(RuntimeError):
    """A size traced size-obliviously as "not 1" is 1 in this call: the graph (and Dynamo's graph it came
    from, which shares the assumption) would compute the wrong thing (a squeeze traced as a no-op), so the
    call raises instead of returning a wrong result."""


def squeezed_symbolic_sizes(gm: fx.GraphModule) -> List[sympy.Expr]:
    """Sizes a `squeeze` was asked to remove while symbolic: traced size-obliviously (serving shapes),
    the squeeze is a no-op that is only right while the size is not 1."""
    found = []
    for node in gm.graph.find_nodes(op="call_function", target=aten.squeeze.dim) + \
            gm.graph.find_nodes(op="call_function", target=aten.squeeze.dims):
        src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(src, torch.Tensor):
            continue
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        for d in dims:
            size = src.shape[d]
            if isinstance(size, torch.SymInt) and size.node.expr.free_symbols:
                found.append(size.node.expr)
    return found

MAX_CONSECUTIVE_FAILURES = 3


class GraphExecutor:
    def __init__(self, name: str, compiled: Callable, fallback: fx.GraphModule, *, strict: bool,
                 report: Optional[GraphReport], warned: Set[str]):
        self.name = name
        self.squeezed = squeezed_symbolic_sizes(fallback)
        self.bind = SymbolBinder([n.meta.get("val") for n in fallback.graph.find_nodes(op="placeholder")]) \
            if self.squeezed else None
        self.compiled = compiled
        self.fallback = fallback
        self.strict = strict
        self.report = report
        self.warned = warned
        self.failed = False
        self.consecutive_failures = 0

    def __call__(self, *args):
        if self.squeezed:
            self._check_sizes(args)
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

    def _check_sizes(self, args) -> None:
        bindings = self.bind(args)
        for expr in self.squeezed:
            if int(expr.xreplace(bindings)) == 1:
                raise SizeAssumptionBroken(
                    f"kunlun backend: {self.name} squeezes a dim of size {expr}, traced as never 1 (sizes are traced "
                    "size-obliviously under kunlun_compile.compile(dynamic=True) / serving_shapes()), and it is 1 in "
                    "this call: the squeeze would be skipped. Compile this model with dynamic=False or plain "
                    "torch.compile(dynamic=True), or reshape instead of squeeze")

    def _compiled_failed(self, reason: str) -> None:
        self.consecutive_failures += 1
        self.failed = self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES
        warn_once(f"kunlun backend: compiled graph {self.name} failed at run time and the call ran uncompiled "
                  f"(after {MAX_CONSECUTIVE_FAILURES} such calls in a row it stays uncompiled): {reason}",
                  self.warned)
        if self.report is not None:
            then = "now runs uncompiled" if self.failed else "ran uncompiled for this call"
            self.report.fallbacks.append(Fallback(self.name, "runtime", f"{then}: {reason}"))
