"""Recording the graphs the backend receives, so the CLI verbs work on them without the model.

With `KUNLUN_COMPILE_DUMP=DIR` set, every ATen graph the backend is about to compile (after
capture, before any pass) is written to `DIR/graph_N/`:
- `graph.py`: the readable code;
- `graph.json` (+ `constants.pt` when the graph holds tensors): every node, exactly
  (debug/graph_io.py);
- `inputs.json`: per input its shape, dtype, strides, which dims are symbolic (the token count),
  whether it is a parameter, and the statistics its seeded stand-in reproduces: integer range,
  mean/std of floats, the share of True.
No tensor of the user's is stored: `load_recorded` draws every input from a seeded generator
within those statistics, so ids stay in range and norm weights near their values.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .graph_io import graph_from_data, graph_to_data

ENV_DUMP = "KUNLUN_COMPILE_DUMP"
SEED = 0


def dump_dir() -> Optional[str]:
    return os.environ.get(ENV_DUMP) or None


def _hint(size) -> int:
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else int(size.node.shape_env.size_hint(size.node.expr))
    return int(size)


def _stats(real: Optional[torch.Tensor]) -> Dict[str, Any]:
    if real is None or real.numel() == 0 or real.device.type == "meta":
        return {}
    x = real.detach()
    if x.dtype == torch.bool:
        return {"true_share": x.float().mean().item()}
    if x.is_floating_point():
        x = x.float()
        return {"mean": x.mean().item(), "std": x.std().item() if x.numel() > 1 else 0.0}
    return {"min": int(x.min()), "max": int(x.max())}


def describe_input(fake: Any, real: Any, is_parameter: bool) -> Dict[str, Any]:
    if isinstance(fake, torch.SymInt) or isinstance(fake, int):
        return {"kind": "int", "value": _hint(fake), "symbolic": isinstance(fake, torch.SymInt)}
    if not isinstance(fake, torch.Tensor):
        return {"kind": "other", "repr": repr(fake)}
    return {
        "kind": "tensor",
        "shape": [_hint(s) for s in fake.shape],
        "stride": [_hint(s) for s in fake.stride()],
        "dtype": str(fake.dtype).replace("torch.", ""),
        "device": fake.device.type,
        "symbolic_dims": [d for d, s in enumerate(fake.shape) if isinstance(s, torch.SymInt)],
        "parameter": is_parameter,
        "stats": _stats(real if isinstance(real, torch.Tensor) else None),
    }


def record_graph(directory: str, gm: fx.GraphModule, fake_inputs: Sequence[Any],
                 real_inputs: Optional[Sequence[Any]], static_indices: Sequence[int]) -> str:
    """Write one graph under `directory/graph_N` (the next free N); returns that path."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # called mid-compile, where tensor ops would be faked
        return _record(directory, gm, fake_inputs, real_inputs, static_indices)


def _record(directory: str, gm: fx.GraphModule, fake_inputs: Sequence[Any],
            real_inputs: Optional[Sequence[Any]], static_indices: Sequence[int]) -> str:
    os.makedirs(directory, exist_ok=True)
    n = 0
    while True:
        path = os.path.join(directory, f"graph_{n}")
        try:
            os.makedirs(path)
            break
        except FileExistsError:
            n += 1
    reals = list(real_inputs) if real_inputs is not None and len(real_inputs) == len(fake_inputs) else None
    static = set(static_indices)
    inputs = [describe_input(f, reals[i] if reals else None, i in static) for i, f in enumerate(fake_inputs)]
    with open(os.path.join(path, "graph.py"), "w") as f:
        f.write(gm.print_readable(print_output=False))
    data, constants = graph_to_data(gm)
    with open(os.path.join(path, "graph.json"), "w") as f:
        json.dump(data, f)
    if constants:
        torch.save(constants, os.path.join(path, "constants.pt"))
    with open(os.path.join(path, "inputs.json"), "w") as f:
        json.dump({"torch": torch.__version__, "seed": SEED, "inputs": inputs}, f, indent=1)
    return path


def is_recorded_graph(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "graph.json"))


def _stand_in(spec: Dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"])
    shape, stride, stats = spec["shape"], spec["stride"], spec.get("stats", {})
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
    import kunlun_compile.ops  # noqa: F401

    with open(os.path.join(path, "graph.json")) as f:
        data = json.load(f)
    constants_file = os.path.join(path, "constants.pt")
    constants = torch.load(constants_file) if os.path.isfile(constants_file) else {}
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
