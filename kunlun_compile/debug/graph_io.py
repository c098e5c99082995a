"""An FX graph to JSON and back, exactly: every node with its target and arguments.

`torch.save(GraphModule)` is not faithful: unpickling re-traces the generated code, and a factory
call with constant arguments (`aten.zeros.default([16, 16], ...)`) runs at that trace and comes
back as a tensor constant, so a recorded graph would no longer match the patterns it matched
live.  Here nodes are rebuilt one by one: ATen/custom ops by qualified name, Python builtins
(`operator.getitem`, SymInt arithmetic) by module and name; tensors held by `get_attr` nodes go
to a side file.
"""
from __future__ import annotations

import importlib
import math
import operator
from typing import Any, Dict, Tuple

import torch
import torch.fx as fx

_BUILTIN_MODULES = {"_operator": operator, "operator": operator, "math": math, "builtins": __builtins__,
                    "torch": torch}


def _target_to_data(target: Any) -> Any:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return {"op": target._schema.name, "overload": target._overloadname}
    module = getattr(target, "__module__", None)
    if module in _BUILTIN_MODULES or (module or "").startswith("torch"):
        return {"py": module, "name": target.__name__}
    raise ValueError(f"cannot record a node calling {target!r}")


def _target_from_data(data: Any) -> Any:
    if isinstance(data, str):
        return data
    if "op" in data:
        namespace, name = data["op"].split("::")
        return getattr(getattr(getattr(torch.ops, namespace), name), data["overload"])
    if data["py"].startswith("torch.ops."):  # higher-order ops (auto_functionalized): torch.ops.higher_order.X
        obj = torch
        for part in data["py"].split(".")[1:] + [data["name"]]:
            obj = getattr(obj, part)
        return obj
    module = _BUILTIN_MODULES.get(data["py"]) or importlib.import_module(data["py"])
    return module[data["name"]] if isinstance(module, dict) else getattr(module, data["name"])


def _value_to_data(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, (list, tuple)):
        return {"list" if isinstance(v, list) else "tuple": [_value_to_data(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": {k: _value_to_data(x) for k, x in v.items()}}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v).replace("torch.", "")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).replace("torch.", "")}
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": repr(v)}
    if isinstance(v, torch._ops.OpOverload):  # auto_functionalized's first argument: the op it wraps
        return {"opref": _target_to_data(v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"cannot record an argument of type {type(v).__name__}: {v!r}")


def _value_from_data(d: Any, nodes: Dict[str, fx.Node]) -> Any:
    if not isinstance(d, dict):
        return d
    (kind, v), = d.items()
    if kind == "node":
        return nodes[v]
    if kind in ("list", "tuple"):
        items = [_value_from_data(x, nodes) for x in v]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _value_from_data(x, nodes) for k, x in v.items()}
    if kind == "float":
        return float(v)
    if kind == "opref":
        return _target_from_data(v)
    if kind == "device":
        return torch.device(v)
    return getattr(torch, v)  # dtype, layout, memory_format


def graph_to_data(gm: fx.GraphModule) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(JSON-ready description of every node, the tensors its get_attr nodes read)."""
    nodes, tensors = [], {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            tensors[n.target] = getattr(gm, n.target)
        nodes.append({"op": n.op, "name": n.name, "target": _target_to_data(n.target),
                      "args": _value_to_data(n.args), "kwargs": _value_to_data(n.kwargs)})
    return {"nodes": nodes}, tensors


def graph_from_data(data: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> fx.GraphModule:
    graph = fx.Graph()
    built: Dict[str, fx.Node] = {}
    for d in data["nodes"]:
        args = _value_from_data(d["args"], built)
        kwargs = _value_from_data(d["kwargs"], built)
        node = graph.create_node(d["op"], _target_from_data(d["target"]), tuple(args), dict(kwargs), name=d["name"])
        built[d["name"]] = node
    root = torch.nn.Module()
    for name, t in tensors.items():
        root.register_buffer(name, t)
    return fx.GraphModule(root, graph)
