"""Turn Dynamo's torch-level graph into an ATen inference graph.

AOTAutograd does the work: it functionalizes (no in-place ops or aliasing
left in the graph; input mutations are applied by its runtime wrapper after
our graph returns), lifts parameters to graph inputs, applies our one
decomposition table, and keeps Dynamo's symbolic sizes as SymInts whose
expressions are sympy, so one graph serves every batch size.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd

from .decompositions import decomposition_table

# (aten graph, its example inputs: FakeTensors / SymInts) -> runnable callable
GraphCompiler = Callable[[fx.GraphModule, List[Any]], Callable]


def needs_autograd(example_inputs: Sequence[Any]) -> bool:
    """True when running this graph must record gradients.

    This backend compiles inference graphs only; a training graph is run
    eagerly by the caller, so gradients stay exactly those of PyTorch.
    """
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def to_aten_inference(gm: fx.GraphModule, example_inputs: Sequence[Any], compile_graph: GraphCompiler) -> Callable:
    """Capture `gm` as an ATen inference graph and hand it to `compile_graph`."""
    backend = aot_autograd(
        fw_compiler=compile_graph,
        inference_compiler=compile_graph,
        decompositions=decomposition_table(),
        keep_inference_input_mutations=False,
    )
    return backend(gm, list(example_inputs))


def static_input_indices() -> List[int]:
    """Positions of the graph inputs that are parameters or buffers (fixed addresses), as AOTAutograd
    recorded them for the graph being compiled; [] outside a compile."""
    context = torch._guards.TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None) if context is not None else None
    return list(getattr(meta, "static_input_indices", None) or [])
