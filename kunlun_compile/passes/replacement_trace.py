"""Recording a replacement's ATen graph without `make_fx`.

A replacement runs once per match on the matched nodes' fake values, with static sizes in most compiles.
`make_fx` sets up a proxy tracer, the Python dispatcher and functionalization on every call: ~6-12 ms each
on the CPU hosts, most of a compile's pattern work (benchmarks/NOTES.md v35).  This records the same graph
with one dispatch mode: every ATen op the replacement calls becomes a node whose value is the fake tensor
the op returned.

It takes only what it can record as `make_fx` would; anything else raises `Unrecordable` and the caller
traces with `make_fx`:
- symbolic sizes, strides or offsets (make_fx records the size arithmetic as nodes; here it would be lost);
- ops that mutate a tensor (functionalization would rewrite them; NOTES v36 says why that is not done here);
- a tensor that is neither an input nor an op's result (a constant made outside the dispatcher).
Decompositions are applied as make_fx applies them: the backend's table first, then an op's composite
kernel when the op reaches the mode whole (below autograd, as inside vLLM's compile).  Every node carries
`val` and `tensor_meta`, as make_fx leaves them (torch 2.11's matcher asserts `tensor_meta`).  Equality with
make_fx, rule by rule and in four dispatch states: tests/test_replacement_trace.py.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode

from ..capture.decompositions import decomposition_table


class Unrecordable(Exception):
    """The replacement does something only make_fx records faithfully."""


def _static(v: torch.Tensor) -> bool:
    return all(isinstance(d, int) for d in (*v.shape, *v.stride(), v.storage_offset()))


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: fx.Graph, nodes: Dict[int, fx.Node]):
        super().__init__()
        self.graph, self.nodes = graph, nodes
        self.alive: List[Any] = []  # keeps every recorded tensor alive, so no id is reused mid-trace
        self.decompositions = decomposition_table()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.decompositions:
            with self:
                return self.decompositions[func](*args, **kwargs)
        # below autograd (inside vLLM's compile) composite ops reach this mode whole, where they otherwise
        # arrive decomposed: decomposed here as make_fx decomposes them (`x.to(dtype)` -> _to_copy)
        if func.namespace != "prim":  # prim ops (prim::device) are not in the dispatcher's registry
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        schema = func._schema
        if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            raise Unrecordable(f"{func} mutates an input")
        node_args = pytree.tree_map(self._arg, (tuple(args), dict(kwargs)))  # refuses constants before running
        out = func(*args, **kwargs)
        if not any(isinstance(o, torch.Tensor) for o in pytree.tree_leaves(out)):
            if any(isinstance(o, (torch.SymInt, torch.SymFloat, torch.SymBool)) for o in pytree.tree_leaves(out)):
                raise Unrecordable(f"{func} returns a symbolic scalar")
            return out  # a device, a size: static here, a constant in make_fx's graph too
        node = self.graph.call_function(func, *node_args)
        node.meta["val"] = out  # a tuple's node keeps the tuple, and no tensor_meta (as make_fx)
        if isinstance(out, torch.Tensor):
            self._bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"] = o
                    self._bind(o, item)
                elif o is not None:
                    raise Unrecordable(f"{func} returns {type(o).__name__} beside tensors")
        return out

    def _bind(self, value: torch.Tensor, node: fx.Node) -> None:
        if not _static(value):
            raise Unrecordable(f"{node.target} gives symbolic sizes")
        _set_tensor_meta(node, value)
        self.alive.append(value)
        self.nodes[id(value)] = node

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            node = self.nodes.get(id(a))
            if node is None:
                raise Unrecordable("a tensor made outside the dispatcher (a constant)")
            return node
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise Unrecordable("a symbolic scalar")
        return a


def _set_tensor_meta(node: fx.Node, value: torch.Tensor) -> None:
    """A tensor node's `tensor_meta`, as make_fx leaves it: torch 2.11's pattern matcher asserts it on every
    replacement node whose value is a tensor."""
    node.meta["tensor_meta"] = _extract_tensor_metadata(value)


def record(fn: Callable, example_vals: Sequence[Any]) -> fx.GraphModule:
    """`fn`'s ATen graph on these fake tensors (static sizes), with each node's value in meta["val"]."""
    graph = fx.Graph()
    nodes: Dict[int, fx.Node] = {}
    for i, v in enumerate(example_vals):
        if not isinstance(v, torch.Tensor) or not _static(v):
            raise Unrecordable(f"input {i} is not a tensor of static sizes")
        p = graph.placeholder(f"arg{i}_1")  # make_fx's names
        p.meta["val"] = v
        _set_tensor_meta(p, v)
        nodes[id(v)] = p
    recorder = _Recorder(graph, nodes)
    mode = getattr(example_vals[0], "fake_mode", None) if example_vals else None
    if mode is None:
        raise Unrecordable("inputs are not fake tensors")
    with torch.no_grad(), mode, recorder:
        out = fn(*example_vals)
    graph.output(pytree.tree_map(recorder._arg, out))
    return _LazyGraphModule(torch.nn.Module(), graph)  # only its graph is read: no Python code generated
