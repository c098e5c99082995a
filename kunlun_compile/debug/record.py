"""Replaying recorded graphs (capture/record.py writes them; KUNLUN_COMPILE_DUMP=DIR or
`kunlun-compile record`): a recorded graph as a module, with seeded stand-ins for its inputs.

Recorded graphs travel in bug reports, so they are loaded as untrusted input (capture/graph_io.py
checks every node against its allow-list; constants are read with `weights_only`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.fx as fx

from ..capture.graph_io import TYPED_CONSTANTS, RecordedGraphError, graph_from_data
from ..capture.record import DATA_DEPENDENT_SIZE, SEED


def is_recorded_graph(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "graph.json"))


def _stand_in(spec: Dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    dtype = TYPED_CONSTANTS["dtype"].get(spec["dtype"])  # a fixed table: inputs.json is untrusted
    if dtype is None:
        raise RecordedGraphError(f"inputs.json: {spec['dtype']!r} is not a dtype")
    shape, stride, stats = spec["shape"], spec["stride"], spec.get("stats", {})
    if any(s is not None and (not isinstance(s, int) or s < 0) for s in (*shape, *stride)) or len(shape) != len(stride):
        raise RecordedGraphError(f"inputs.json: sizes {shape} / strides {stride} are not non-negative ints")
    if None in shape or None in stride:  # data-dependent sizes: a contiguous stand-in
        shape = [DATA_DEPENDENT_SIZE if s is None else s for s in shape]
        stride = list(torch.empty(shape, device="meta").stride())
    # storage for the recorded strides: the largest offset reached, plus one
    numel = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    if dtype == torch.bool:
        flat = torch.rand(numel, generator=gen) < stats.get("true_share", 0.5)
    elif dtype.is_floating_point or dtype.is_complex:
        std = stats.get("std", 1.0)
        flat = torch.randn(numel, generator=gen) * std + stats.get("mean", 0.0)
        flat = flat.to(dtype)
    else:
        lo, hi = stats.get("min", 0), stats.get("max", 1)
        flat = torch.randint(lo, hi + 1, (numel,), generator=gen).to(dtype)
    out = torch.as_strided(flat, shape, stride)
    return out.to(spec["device"]) if spec["device"] != "cpu" and torch.cuda.is_available() else out


def load_recorded(path: str) -> Tuple["RecordedGraph", List[torch.Tensor]]:
    """A recorded graph as a module, and seeded stand-ins for its tensor inputs (dims that were
    symbolic are marked dynamic, so compiling the module traces the graph as it was recorded)."""
    import kunlun_compile.models  # noqa: F401 - registers the custom ops the graph may call
    import kunlun_compile.ops  # noqa: F401 - registers the kunlun:: ops the graph may call

    with open(os.path.join(path, "graph.json")) as f:
        data = json.load(f)
    constants_file = os.path.join(path, "constants.pt")
    # weights_only: a recorded graph is shared in bug reports, never unpickle code from it
    constants = torch.load(constants_file, weights_only=True) if os.path.isfile(constants_file) else {}
    gm = graph_from_data(data, constants)
    with open(os.path.join(path, "inputs.json")) as f:
        meta = json.load(f)
    gen = torch.Generator().manual_seed(meta.get("seed", SEED))
    specs = meta["inputs"]
    tensors = [_stand_in(spec, gen) for spec in specs if spec["kind"] == "tensor"]
    module = RecordedGraph(gm, specs)
    for x, spec in zip(tensors, (s for s in specs if s["kind"] == "tensor")):
        for d in spec.get("symbolic_dims", []):
            torch._dynamo.maybe_mark_dynamic(x, d)
    return module, tensors


class RecordedGraph(torch.nn.Module):
    """A recorded ATen graph as a module of its tensor inputs: compiling it sends the same graph
    through the backend.  A symbolic int input (a token count) is read off the tensor dim it was
    equal to when recorded, so it stays symbolic."""

    def __init__(self, gm: fx.GraphModule, specs: Sequence[Dict[str, Any]]):
        super().__init__()
        self.graph_module = gm
        self.arg_sources: List[Tuple[str, Any]] = []  # ("tensor", k) | ("dim", (k, d)) | ("const", v)
        tensor_specs = [s for s in specs if s["kind"] == "tensor"]
        k = 0
        for spec in specs:
            if spec["kind"] == "tensor":
                self.arg_sources.append(("tensor", k))
                k += 1
            elif spec["kind"] == "int" and spec.get("symbolic"):
                where = next(((j, d) for j, t in enumerate(tensor_specs) for d in t["symbolic_dims"]
                              if t["shape"][d] == spec["value"]), None)
                self.arg_sources.append(("dim", where) if where else ("const", spec["value"]))
            elif spec["kind"] == "int":
                self.arg_sources.append(("const", spec["value"]))
            else:
                raise ValueError(f"recorded input of kind {spec['kind']} ({spec.get('repr')}) cannot be replayed")

    def forward(self, *tensors):
        args = [tensors[v] if kind == "tensor" else tensors[v[0]].shape[v[1]] if kind == "dim" else v
                for kind, v in self.arg_sources]
        out = self.graph_module(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else out
