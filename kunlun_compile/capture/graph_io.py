"""An FX graph to JSON and back, exactly: every node with its target and arguments.

`torch.save(GraphModule)` is not faithful: unpickling re-traces the generated code, and a factory
call with constant arguments (`aten.zeros.default([16, 16], ...)`) runs at that trace and comes
back as a tensor constant, so a recorded graph would no longer match the patterns it matched
live.  Here nodes are rebuilt one by one: ATen/custom ops by qualified name, Python builtins
(`operator.getitem`, SymInt arithmetic) by module and name; tensors held by `get_attr` nodes go
to a side file.

Recorded graphs travel in bug reports, so loading treats them as untrusted: the whole file is
checked before anything is built, and only an allow-list of callables is ever resolved (ops of the
namespaces below, the `operator`/`math`/`torch.sym_*` functions of symbolic-shape arithmetic, the
higher-order ops functionalization emits).  Names that FX pastes into the code it generates
(placeholder and get_attr targets, node names, keyword names) must be plain identifiers.
Anything else raises `UntrustedGraphError`, naming the node; nothing is imported or called.
"""
from __future__ import annotations

import contextlib
import contextvars
import keyword
import math
import operator
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, Mapping, Optional, Set, Tuple

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

_BUILTIN_MODULES = {"_operator", "operator", "math", "builtins"}  # recorded by module and name

# Op namespaces a recorded graph may call: ATen and prims, the ops this package registers
# (ops/*.py: kunlun::, models/attention_op.py: kunlun_models::) and vLLM's attention ops, which
# graphs captured under vLLM call (runtime/splitting.py splits at them).
TRUSTED_OP_NAMESPACES = frozenset({"aten", "prims", "kunlun", "kunlun_models", "vllm"})

# The Python functions AOT graphs call: tuple indexing and symbolic-shape arithmetic.
_OPERATOR_FUNCTIONS = ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                       "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
                       "rshift")
_UNARY_OPERATOR_FUNCTIONS = ("neg", "pos", "abs", "not_", "invert")
_MATH_FUNCTIONS = ("ceil", "floor", "trunc")
_TORCH_SYM_FUNCTIONS = ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
                        "_sym_sqrt", "_sym_cos", "_sym_sin", "_sym_tan", "_sym_cosh", "_sym_sinh", "_sym_tanh",
                        "_sym_asin", "_sym_acos", "_sym_atan", "_sym_log2")
_HIGHER_ORDER_OPS = ("auto_functionalized", "auto_functionalized_v2")

_LOADED_NODE_KINDS = ("placeholder", "get_attr", "call_function", "output")
_ARG_COUNTS = {"placeholder": (0, 0), "get_attr": (0, 0), "output": (1, 1)}  # (min, max); no placeholder defaults
# dtype / layout / memory_format arguments by name, read from torch's namespace without getattr
# (which would import lazily loaded submodules for names like "onnx")
TYPED_CONSTANTS = {kind: {name: v for name, v in vars(torch).items() if isinstance(v, cls)}
                    for kind, cls in (("dtype", torch.dtype), ("layout", torch.layout),
                                      ("memory_format", torch.memory_format))}
_NON_FINITE = ("inf", "-inf", "nan")
_MAX_NESTING = 32


class RecordedGraphError(ValueError):
    """A recorded graph file that is malformed: it cannot be rebuilt as written."""


class UntrustedGraphError(RecordedGraphError):
    """A recorded graph that names something outside the loader's allow-list (a function, module,
    op namespace or a name that would be pasted into generated code)."""


def _allowed_python_functions() -> Dict[Tuple[str, str], Callable]:
    table: Dict[Tuple[str, str], Callable] = {}
    for name in _OPERATOR_FUNCTIONS:
        table[("operator", name)] = table[("_operator", name)] = getattr(operator, name)
    for name in _MATH_FUNCTIONS:
        table[("math", name)] = getattr(math, name)
    table[("builtins", "round")] = round
    for name in _TORCH_SYM_FUNCTIONS:
        if hasattr(torch, name):  # the set varies a little between torch versions
            table[("torch", name)] = getattr(torch, name)
    for name in _HIGHER_ORDER_OPS:
        if hasattr(torch.ops.higher_order, name):
            table[("torch.ops.higher_order", name)] = getattr(torch.ops.higher_order, name)
    return table


_ALLOWED_PYTHON_FUNCTIONS = _allowed_python_functions()
# FX writes operator calls as expressions (`a + b`, `a[i]`), so their positional arity must be exact
_OPERATOR_ARITY = {getattr(operator, name): 1 if name in _UNARY_OPERATOR_FUNCTIONS else 2
                   for name in _OPERATOR_FUNCTIONS}


# ---- writing ------------------------------------------------------------------------------------

def _target_to_data(target: Any) -> Any:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return {"op": target._schema.name, "overload": target._overloadname}
    module = getattr(target, "__module__", None)
    if module in _BUILTIN_MODULES or (module or "").startswith("torch"):
        return {"py": module, "name": target.__name__}
    raise ValueError(f"cannot record a node calling {target!r}")


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


def graph_to_data(gm: fx.GraphModule) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(JSON-ready description of every node, the tensors its get_attr nodes read)."""
    nodes, tensors = [], {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            tensors[n.target] = getattr(gm, n.target)
        nodes.append({"op": n.op, "name": n.name, "target": _target_to_data(n.target),
                      "args": _value_to_data(n.args), "kwargs": _value_to_data(n.kwargs)})
    return {"nodes": nodes}, tensors


# ---- resolving names (the allow-list) -------------------------------------------------------------

def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


# Namespaces a caller trusts for one load on top of TRUSTED_OP_NAMESPACES (`trusting`), per thread/task.
_extra_trusted: contextvars.ContextVar[FrozenSet[str]] = contextvars.ContextVar("kunlun_extra_trusted",
                                                                                default=frozenset())


@contextlib.contextmanager
def trusting(namespaces: Iterable[str]) -> Iterator[None]:
    """Inside: ops of `namespaces` load too.  For graphs this package wrote itself next to artifacts of
    the same process's library (vLLM's compile cache: its `_C::` ops), never for recorded graphs."""
    token = _extra_trusted.set(frozenset(namespaces))
    try:
        yield
    finally:
        _extra_trusted.reset(token)


def _resolve_op(data: Any) -> torch._ops.OpOverload:
    """`{"op": "ns::name", "overload": "default"}` -> the registered OpOverload, for trusted namespaces only."""
    qualified, overload = data.get("op"), data.get("overload")
    if not isinstance(qualified, str) or not isinstance(overload, str):
        raise RecordedGraphError(f"malformed op reference {data!r}")
    namespace, sep, name = qualified.partition("::")
    trusted = TRUSTED_OP_NAMESPACES | _extra_trusted.get()
    if not sep or namespace not in trusted:
        raise UntrustedGraphError(f"op {qualified!r} is not in a trusted namespace "
                                  f"({', '.join(sorted(trusted))})")
    if not name.isidentifier() or not overload.isidentifier():  # looked up by getattr: no dotted paths
        raise UntrustedGraphError(f"op {qualified}.{overload} is not a plain op name")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        op = getattr(packet, overload)
    except (AttributeError, RuntimeError) as e:
        raise RecordedGraphError(f"unknown op {qualified}.{overload} (recorded with another torch or "
                                 f"package version?): {e}") from None
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != namespace:
        raise UntrustedGraphError(f"{qualified}.{overload} does not name an op")
    return op


def _resolve_python_function(data: Any) -> Callable:
    key = (data.get("py"), data.get("name"))
    fn = _ALLOWED_PYTHON_FUNCTIONS.get(key) if all(isinstance(k, str) for k in key) else None
    if fn is None:
        raise UntrustedGraphError(f"function {key[0]}.{key[1]} is not one a recorded graph may call "
                                  f"(allowed: ops of trusted namespaces, operator/math/torch.sym_* arithmetic, "
                                  f"{', '.join(_HIGHER_ORDER_OPS)})")
    return fn


def _resolve_target(data: Any) -> Callable:
    if isinstance(data, dict) and "op" in data:
        return _resolve_op(data)
    if isinstance(data, dict) and "py" in data:
        return _resolve_python_function(data)
    raise RecordedGraphError(f"malformed call target {data!r}")


# ---- checking a whole file before building ------------------------------------------------------

def _check_value(d: Any, defined: Set[str], depth: int = 0) -> None:
    """An argument value: a literal, a reference to an earlier node, or a tagged container/constant."""
    if depth > _MAX_NESTING:
        raise RecordedGraphError(f"arguments nested deeper than {_MAX_NESTING} levels")
    if d is None or isinstance(d, (bool, int, float, str)):
        return
    if not (isinstance(d, dict) and len(d) == 1):
        raise RecordedGraphError(f"malformed argument {d!r}")
    (kind, v), = d.items()
    if kind == "node":
        if not isinstance(v, str) or v not in defined:
            raise RecordedGraphError(f"argument refers to {v!r}, which is not an earlier node")
    elif kind in ("list", "tuple") and isinstance(v, list):
        for x in v:
            _check_value(x, defined, depth + 1)
    elif kind == "dict" and isinstance(v, dict):
        for x in v.values():
            _check_value(x, defined, depth + 1)
    elif kind == "float" and v in _NON_FINITE:
        return
    elif kind == "opref":
        _resolve_op(v if isinstance(v, dict) else {})
    elif kind == "device" and isinstance(v, str):
        try:
            torch.device(v)
        except (RuntimeError, ValueError) as e:
            raise RecordedGraphError(f"bad device {v!r}: {e}") from None
    elif kind in TYPED_CONSTANTS:
        if not (isinstance(v, str) and v in TYPED_CONSTANTS[kind]):
            raise UntrustedGraphError(f"{v!r} is not a torch {kind}")
    else:
        raise RecordedGraphError(f"malformed argument {d!r}")


def _check_call_arguments(node: Mapping[str, Any], defined: Set[str]) -> None:
    args, kwargs = node.get("args"), node.get("kwargs")
    if not (isinstance(args, dict) and len(args) == 1 and next(iter(args)) in ("tuple", "list")):
        raise RecordedGraphError("args must be a tuple")
    if not (isinstance(kwargs, dict) and list(kwargs) == ["dict"] and isinstance(kwargs["dict"], dict)):
        raise RecordedGraphError("kwargs must be a dict")
    for name in kwargs["dict"]:
        if not _is_identifier(name):  # FX writes `name = value` into the generated code
            raise UntrustedGraphError(f"keyword argument name {name!r} is not an identifier")
    _check_value(args, defined)
    _check_value(kwargs, defined)


def _check_node(node: Any, defined: Set[str], tensor_names: Optional[Set[str]]) -> None:
    if not isinstance(node, dict):
        raise RecordedGraphError("a node must be an object")
    kind, name, target = node.get("op"), node.get("name"), node.get("target")
    if kind not in _LOADED_NODE_KINDS:
        raise UntrustedGraphError(f"node kind {kind!r} is not loaded (recorded ATen graphs only have "
                                  f"{', '.join(_LOADED_NODE_KINDS)})")
    if not _is_identifier(name) or name in defined:
        raise UntrustedGraphError(f"node name {name!r} is not a fresh identifier")
    fn = None
    if kind == "call_function":
        fn = _resolve_target(target)
    elif kind == "output":
        if target != "output":
            raise RecordedGraphError(f"output node with target {target!r}")
    elif not _is_identifier(target):  # placeholder / get_attr targets are pasted into generated code
        raise UntrustedGraphError(f"{kind} target {target!r} is not an identifier")
    elif kind == "placeholder" and target != name:  # FX names the parameter by target, its uses by name
        raise RecordedGraphError(f"placeholder target {target!r} differs from its name")
    elif kind == "get_attr" and tensor_names is not None and target not in tensor_names:
        raise RecordedGraphError(f"get_attr {target!r} reads no tensor of the constants file")
    _check_call_arguments(node, defined)
    _check_arity(kind, fn, next(iter(node["args"].values())), node["kwargs"]["dict"])


def _check_arity(kind: str, fn: Optional[Callable], args: list, kwargs: dict) -> None:
    low, high = _ARG_COUNTS.get(kind) or (_OPERATOR_ARITY.get(fn),) * 2
    if low is not None and (not low <= len(args) <= high or kwargs):
        what = fn.__name__ if fn is not None else kind
        raise RecordedGraphError(f"{what} takes {low}..{high} arguments and no keywords, "
                                 f"got {len(args)} and {list(kwargs)}")


def _node_label(index: int, node: Any) -> str:
    name = node.get("name") if isinstance(node, dict) else None
    return f"node {index} ({name!r})" if isinstance(name, str) else f"node {index}"


def check_graph_data(data: Any, tensors: Optional[Mapping[str, Any]] = None) -> None:
    """Raise `UntrustedGraphError` / `RecordedGraphError`, naming the node, unless every node of `data`
    (and every constant in `tensors`) is one `graph_from_data` rebuilds from the allow-list."""
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list):
        raise RecordedGraphError("recorded graph: expected an object with a list of nodes")
    if tensors is not None:
        if not isinstance(tensors, Mapping):
            raise RecordedGraphError(f"recorded graph constants: expected a dict of tensors, "
                                     f"got {type(tensors).__name__}")
        for name, t in tensors.items():
            if not _is_identifier(name) or not isinstance(t, torch.Tensor):
                raise UntrustedGraphError(f"recorded graph constants: entry {name!r} is not a tensor under a "
                                          f"plain name")
    defined: Set[str] = set()
    tensor_names = set(tensors) if tensors is not None else None
    for index, node in enumerate(nodes):
        try:
            _check_node(node, defined, tensor_names)
        except RecordedGraphError as e:
            raise type(e)(f"recorded graph, {_node_label(index, node)}: {e}") from None
        defined.add(node["name"])


# ---- building (only after the whole file was checked) --------------------------------------------

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
        return _resolve_op(v)
    if kind == "device":
        return torch.device(v)
    return TYPED_CONSTANTS[kind][v]  # dtype, layout, memory_format


def graph_from_data(data: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> fx.GraphModule:
    """The graph `graph_to_data` described; raises `UntrustedGraphError` (a ValueError) naming the
    first node outside the allow-list, before anything is built."""
    check_graph_data(data, tensors)
    graph = fx.Graph()
    built: Dict[str, fx.Node] = {}
    for d in data["nodes"]:
        target = _resolve_target(d["target"]) if d["op"] == "call_function" else d["target"]
        args = _value_from_data(d["args"], built)
        kwargs = _value_from_data(d["kwargs"], built)
        built[d["name"]] = graph.create_node(d["op"], target, tuple(args), dict(kwargs), name=d["name"])
    root = torch.nn.Module()
    for name, t in tensors.items():
        root.register_buffer(name, t)
    return _LazyGraphModule(root, graph)  # its Python code is generated when first run or read
