"""Where every value of a split graph lives, and the checks that make replaying its pieces safe.

`plan_memory(split, captured, parameters)` is a pure function of the split graph (runtime/splitting.py),
the pieces that will be captured and the graph inputs that are parameters.  It gives each value a home:

- `caller`: a graph input the caller owns (read, never written: the graphs are functional);
- `parameter`: a parameter/buffer input, read in place by the captures (their addresses key the
  capture sets, runtime/capture_sets.py);
- `graph:<i>`: an output of captured piece i, or a view of one: it lives in the graphs' shared pool
  and the next replay of that capture rewrites it;
- `call:<i>`: made by uncaptured piece i for this call only (ordinary allocations).

and proves, or refuses, the rules of the runtime's memory contract (runtime/__init__.py):

1. a value in graph memory is produced before every use in the call (pieces run in graph order, each
   once per call, so nothing replays its producer before its last use);
2. a captured piece never writes to one of its inputs in place: it would write the capture's copy of
   the input, not the caller's tensor;
3. a graph output that may share memory with graph memory is copied before it is handed back, and
   outputs that share one storage are copied as one storage (their aliasing survives the copy);
4. a graph output that is a view of a caller's input is computed outside captures (the splitter
   keeps such view chains in uncaptured pieces), so the caller gets a view of its own tensor.

Violations of rules 1, 2 and 4 are returned as reasons not to capture the pieces concerned.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, List, Set

import torch

from .aliasing import view_base, writes_inputs
from .splitting import SplitGraph

@dataclasses.dataclass
class ValuePlan:
    name: str
    home: str  # "caller", "parameter", "graph:<piece>", "call:<piece>"
    producer: int  # piece index, -1 for a graph input
    consumers: List[int]  # piece indices, in order; len(pieces) stands for the graph output
    base: str  # the value whose memory this one shares (itself unless a view)


@dataclasses.dataclass
class OutputCopy:
    """Graph output `index` is copied; outputs with the same `group` share a storage, copied once."""
    index: int
    group: int


@dataclasses.dataclass
class MemoryPlan:
    values: Dict[str, ValuePlan]
    output_copies: List[OutputCopy]
    refusals: Dict[int, str]  # piece index -> why it must not be captured

    def describe(self) -> List[str]:
        """One line per value crossing pieces: where it lives, who makes and who reads it."""
        lines = []
        for v in self.values.values():
            if v.producer < 0 and not v.consumers:
                continue
            made = "input" if v.producer < 0 else f"piece {v.producer}"
            alias = "" if v.base == v.name else f", view of {v.base}"
            lines.append(f"{v.name}: {v.home}{alias}; made by {made}, read by {v.consumers}")
        return lines


def plan_memory(split: SplitGraph, captured: Set[int], parameters: FrozenSet[str]) -> MemoryPlan:
    """The homes of `split`'s values when the pieces in `captured` are captured (see the module doc)."""
    values: Dict[str, ValuePlan] = {}
    for name in split.graph_inputs:
        values[name] = ValuePlan(name, "parameter" if name in parameters else "caller", -1, [], name)
    refusals: Dict[int, str] = {}
    for piece in split.pieces:
        graph = piece.gm.graph
        # by position: the piece's node names may differ from the value names (renamed on collision)
        input_of = {p: name for p, name in zip(graph.find_nodes(op="placeholder"), piece.inputs)}
        output_nodes = list(next(iter(graph.find_nodes(op="output"))).args[0])
        for name in piece.inputs:
            if name not in values:
                refusals.setdefault(piece.index, f"reads {name} before any piece makes it")
                continue
            values[name].consumers.append(piece.index)
        value_of = {node: name for name, node in zip(piece.outputs, output_nodes)}
        for name, node in zip(piece.outputs, output_nodes):
            base = view_base(node)
            source = values.get(input_of[base]) if base.op == "placeholder" else None
            if source is not None and (source.home == "parameter" or piece.index not in captured):
                home, base_name = source.home, source.base  # a view of memory the piece reads in place
            else:  # fresh memory, or a view of the capture's own copy of an input
                home = f"graph:{piece.index}" if piece.index in captured else f"call:{piece.index}"
                base_name = source.base if source is not None else value_of.get(base, f"{piece.index}:{base.name}")
            values[name] = ValuePlan(name, home, piece.index, [], base_name)
        if piece.index in captured:
            written = [input_of[view_base(w)] for n in graph.nodes for w in writes_inputs(n)
                       if view_base(w).op == "placeholder"]
            if written:
                refusals.setdefault(piece.index, f"writes its input {written[0]} in place")
    out_index = len(split.pieces)
    copies: List[OutputCopy] = []
    groups: Dict[str, int] = {}
    for i, name in enumerate(split.graph_outputs):
        if not isinstance(name, str) or name not in values:
            continue
        v = values[name]
        v.consumers.append(out_index)
        if v.producer in captured and v.base in values and values[v.base].home == "caller":  # kept out by the splitter
            refusals.setdefault(v.producer, f"returns {name}, a view of the caller's input {v.base}")
        if v.home.startswith("graph:"):
            copies.append(OutputCopy(i, groups.setdefault(v.base, len(groups))))
    return MemoryPlan(values, copies, refusals)


def copy_outputs(outputs: List, copies: List[OutputCopy]) -> List:
    """`outputs` with the planned ones copied out of graph memory; outputs of one group keep sharing
    memory with each other (one copy of the storage they span, each re-viewed at its own offset)."""
    if not copies:
        return outputs
    out = list(outputs)
    by_group: Dict[int, List[int]] = {}
    for c in copies:
        if isinstance(out[c.index], torch.Tensor):
            by_group.setdefault(c.group, []).append(c.index)
    for indices in by_group.values():
        if len(indices) == 1:
            out[indices[0]] = out[indices[0]].clone()
            continue
        _copy_together(out, indices)
    return out


def _copy_together(out: List, indices: List[int]) -> None:
    tensors = [out[i] for i in indices]
    storage = tensors[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors):
        for i in indices:  # the plan thought they might share memory; they do not
            out[i] = out[i].clone()
        return
    fresh = torch.empty(storage.nbytes(), dtype=torch.uint8, device=tensors[0].device)
    fresh.copy_(torch.empty(0, dtype=torch.uint8, device=tensors[0].device).set_(storage))
    for i, t in zip(indices, tensors):
        out[i] = torch.empty(0, dtype=t.dtype, device=t.device).set_(
            fresh.untyped_storage(), t.storage_offset(), t.shape, t.stride())
