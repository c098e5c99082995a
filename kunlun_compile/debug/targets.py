"""What the CLI verbs run: a TARGET resolved to (module, example inputs), and the check against eager."""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves, tree_map

from ..backend import KunlunBackend
from .record import is_recorded_graph, load_recorded
from ..models import BUILTIN_CONFIGS, build_model, builtin_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Relative error (against eager) under which a compiled output counts as equal.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


DEFAULT_TOKENS = 16  # tokens per call of a built-in model when none are asked for
# How a factory must return its model, for the error messages.
FACTORY_FORM = "return (module, example_inputs), e.g. `return model.eval(), (torch.randn(4, 8),)`"


class TargetError(ValueError):
    """A TARGET that cannot be built as asked; the CLI prints the message as one line."""


@dataclasses.dataclass
class Target:
    name: str
    module: Callable
    inputs: Tuple[Any, ...]


def resolve_target(spec: str, *, dtype: Optional[torch.dtype] = None, num_tokens: Optional[int] = None) -> Target:
    """A built-in model name, `path/to/file.py:factory` returning (module, example_inputs), or a
    graph recorded with KUNLUN_COMPILE_DUMP (its directory, `DIR/graph_N`).

    `dtype` / `num_tokens` None: as the target comes (built-in models: float32, 16 tokens).  A
    factory's module and floating inputs are cast to `dtype`; `num_tokens` reaches a factory with a
    `tokens` parameter.  Anything that cannot be done as asked raises TargetError."""
    if is_recorded_graph(spec):
        return _recorded_target(spec, dtype, num_tokens)
    if spec in builtin_names():
        return _builtin_target(spec, dtype, num_tokens)
    if os.path.isdir(spec):
        raise TargetError(f"{spec} is a directory but not a recorded graph (no graph.json in it); record one "
                          f"with `kunlun-compile record TARGET DIR` or KUNLUN_COMPILE_DUMP=DIR")
    if ":" in spec:
        path, factory_name = spec.rsplit(":", 1)
        if os.path.isfile(path):
            return _factory_target(spec, path, factory_name, dtype, num_tokens)
        raise TargetError(f"unknown target {spec!r}: there is no file {path!r}")
    raise TargetError(f"unknown target {spec!r}; give a built-in model ({', '.join(builtin_names())}), "
                      f"path/to/file.py:factory, or a graph directory recorded with KUNLUN_COMPILE_DUMP=DIR")


def _recorded_target(spec: str, dtype, num_tokens) -> Target:
    if dtype is not None or num_tokens is not None:
        raise TargetError(f"{spec} is a recorded graph: it replays at its recorded shapes and dtypes, so a dtype "
                          f"or token count (--dtype, --tokens) cannot apply; leave them out")
    try:
        module, inputs = load_recorded(spec)
    except Exception as e:  # noqa: BLE001 - a damaged recording: say which and why, in one line
        raise TargetError(f"cannot load the recorded graph {spec}: {_one_line(e)}") from e
    return Target(spec, module, tuple(inputs))


def _builtin_target(name: str, dtype, num_tokens) -> Target:
    tokens = DEFAULT_TOKENS if num_tokens is None else num_tokens
    most = BUILTIN_CONFIGS[name].max_position_embeddings
    if not 1 <= tokens <= most:
        raise TargetError(f"{name} takes 1 to {most} tokens per call (its positions), got {tokens}")
    model, inputs = build_model(name, dtype=dtype or torch.float32, num_tokens=tokens)
    return Target(name, model, inputs)


def _factory_target(spec: str, path: str, factory_name: str, dtype, num_tokens) -> Target:
    factory = _load_factory(path, factory_name)
    kwargs = _factory_kwargs(factory, spec, num_tokens)
    try:
        result = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code failed: name it, in one line
        raise TargetError(f"{spec} raised {_one_line(e)}") from e
    module, inputs = _unpack_factory_result(result, spec)
    if dtype is not None:
        module, inputs = _cast_floats(module, inputs, dtype)
    return Target(spec, module, inputs)


def _load_factory(path: str, factory_name: str) -> Callable:
    spec_obj = importlib.util.spec_from_file_location(f"kunlun_target_{abs(hash(path))}", path)
    if spec_obj is None or spec_obj.loader is None:
        raise TargetError(f"cannot import {path}: not a Python file")
    mod = importlib.util.module_from_spec(spec_obj)
    try:
        spec_obj.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - a syntax or import error in the user's file
        raise TargetError(f"cannot import {path}: {_one_line(e)}") from e
    factory = getattr(mod, factory_name, None)
    if factory is None:
        raise TargetError(f"{path} has no function {factory_name!r}")
    if not callable(factory):
        raise TargetError(f"{path}:{factory_name} is {_describe(factory)}, not a function; {FACTORY_FORM}")
    return factory


def _factory_kwargs(factory: Callable, spec: str, num_tokens: Optional[int]) -> dict:
    """{"tokens": n} when a token count was asked for; an error when the factory cannot take it."""
    if num_tokens is None:
        return {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "tokens" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return {"tokens": num_tokens}
    raise TargetError(f"a token count (--tokens {num_tokens}) cannot reach {spec}: it has no `tokens` parameter; "
                      f"give it one (def {spec.rsplit(':', 1)[1]}(tokens=16): ...) or leave the token count out")


def _unpack_factory_result(result: Any, spec: str) -> Tuple[Callable, Tuple[Any, ...]]:
    """(module, positional inputs) from what a factory returned: inputs as a tuple or list of
    arguments, or one tensor."""
    if result is None:
        raise TargetError(f"{spec} returned None; {FACTORY_FORM}")
    if isinstance(result, torch.nn.Module):
        raise TargetError(f"{spec} returned a bare module ({type(result).__name__}) without inputs; {FACTORY_FORM}")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TargetError(f"{spec} returned {_describe(result)}; {FACTORY_FORM}")
    module, inputs = result
    if not callable(module):
        raise TargetError(f"{spec} returned {_describe(module)} where the module goes (first); {FACTORY_FORM}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, (tuple, list)):
        inputs = tuple(inputs)
    else:
        raise TargetError(f"{spec} returned {_describe(inputs)} as example_inputs: give a tuple or list of the "
                          f"module's positional arguments (or one tensor); {FACTORY_FORM}")
    for i, x in enumerate(inputs):
        if not _is_input_value(x):
            raise TargetError(f"{spec}: example input {i} is {_describe(x)}; inputs must be tensors, Python "
                              f"numbers or lists/tuples of them")
    return module, inputs


def _is_input_value(x: Any) -> bool:
    if isinstance(x, (list, tuple)):
        return all(_is_input_value(v) for v in x)
    return x is None or isinstance(x, (torch.Tensor, bool, int, float))


def _cast_floats(module: Callable, inputs: Tuple[Any, ...], dtype: torch.dtype):
    """The module's floating parameters and buffers, and the floating input tensors, in `dtype`."""
    if isinstance(module, torch.nn.Module):
        module = module.to(dtype)
    cast = tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, inputs)
    return module, tuple(cast)


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def output_tensors(out: Any) -> List[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclasses.dataclass
class Comparison:
    ok: bool
    max_abs_err: float
    rel_err: float
    tolerance: float


def compare_outputs(got: Any, want: Any) -> Comparison:
    """Worst relative (norm) error and max abs error over all output tensors; NaN never passes."""
    g, w = output_tensors(got), output_tensors(want)
    if len(g) != len(w):
        return Comparison(False, float("inf"), float("inf"), 0.0)
    max_abs, rel, tol, ok = 0.0, 0.0, 0.0, True
    for a, b in zip(g, w):
        if a.shape != b.shape or a.dtype != b.dtype:
            return Comparison(False, float("inf"), float("inf"), 0.0)
        if not a.is_floating_point():
            same = bool((a == b).all())
            ok &= same
            rel = max(rel, 0.0 if same else 1.0)
            continue
        a64, b64 = a.double(), b.double()
        if not torch.isfinite(a64).all() and not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            ok = False
        finite = torch.isfinite(b64)
        diff = (a64 - b64)[finite]
        max_abs = max(max_abs, diff.abs().max().item() if diff.numel() else 0.0)
        r = (diff.norm() / b64[finite].norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
        if r != r:  # NaN
            ok = False
        rel = max(rel, r)
        t = TOLERANCE.get(a.dtype, 1e-4)
        tol = max(tol, t)
        ok &= r <= t
    return Comparison(ok, max_abs, rel, tol)


def run_eager(target: Target) -> Any:
    """The target's eager output (call under inference mode); a target that fails eagerly is the
    user's inputs or model, not the compiler: said so, in one line."""
    try:
        return target.module(*target.inputs)
    except Exception as e:  # noqa: BLE001 - whatever the user's model raises, said in one line
        raise TargetError(f"{target.name} fails eagerly on its example inputs (before any compiling): "
                          f"{_one_line(e)}") from e


def run_compiled(target: Target, backend: KunlunBackend):
    """(compiled output, eager output) under inference mode; compiles fresh.  Eager runs first, so a
    model that fails on its own inputs is reported as such."""
    torch._dynamo.reset()
    with torch.inference_mode():
        want = run_eager(target)
        got = torch.compile(target.module, backend=backend)(*target.inputs)
    return got, want
