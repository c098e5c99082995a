"""What the CLI verbs run: a TARGET resolved to (module, example inputs), and the check against eager."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, List, Tuple

import torch
from torch.utils._pytree import tree_leaves

from ..backend import KunlunBackend
from .record import is_recorded_graph, load_recorded
from ..models import build_model, builtin_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Relative error (against eager) under which a compiled output counts as equal.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclasses.dataclass
class Target:
    name: str
    module: Callable
    inputs: Tuple[Any, ...]


def resolve_target(spec: str, *, dtype: torch.dtype = torch.float32, num_tokens: int = 16) -> Target:
    """A built-in model name, `path/to/file.py:factory` returning (module, example_inputs), or a
    graph recorded with KUNLUN_COMPILE_DUMP (its directory, `DIR/graph_N`)."""
    if is_recorded_graph(spec):
        module, inputs = load_recorded(spec)
        return Target(spec, module, tuple(inputs))
    if spec in builtin_names():
        model, inputs = build_model(spec, dtype=dtype, num_tokens=num_tokens)
        return Target(spec, model, inputs)
    if ":" in spec:
        path, factory_name = spec.rsplit(":", 1)
        if os.path.isfile(path):
            spec_obj = importlib.util.spec_from_file_location(f"kunlun_target_{abs(hash(path))}", path)
            mod = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(mod)
            factory = getattr(mod, factory_name, None)
            if factory is None:
                raise SystemExit(f"error: {path} has no function {factory_name!r}")
            module, inputs = factory()
            if not isinstance(inputs, tuple):
                inputs = (inputs,)
            return Target(spec, module, inputs)
    raise SystemExit(f"error: unknown target {spec!r}; give a built-in model ({', '.join(builtin_names())}), "
                     f"path/to/file.py:factory, or a graph directory recorded with KUNLUN_COMPILE_DUMP=DIR")


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


def run_compiled(target: Target, backend: KunlunBackend):
    """(compiled output, eager output) under inference mode; compiles fresh."""
    torch._dynamo.reset()
    compiled = torch.compile(target.module, backend=backend)
    with torch.inference_mode():
        got = compiled(*target.inputs)
        want = target.module(*target.inputs)
    return got, want
