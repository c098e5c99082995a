"""Recording the graphs the backend receives, so the CLI verbs work on them without the model.

With `KUNLUN_COMPILE_DUMP=DIR` set (or the `dump_dir` option), every ATen graph the backend is
about to compile (after capture, before any pass) is written to `DIR/graph_N/`
(`DIR/rank_R/graph_N/` in a process of a torch.distributed group of more than one, e.g. a vLLM
tensor-parallel worker):
- `graph.py`: the readable code;
- `graph.json` (+ `constants.pt` when the graph holds tensors): every node, exactly
  (capture/graph_io.py);
- `inputs.json`: per input its shape, dtype, strides, which dims are symbolic (the token count),
  whether it is a parameter, and the statistics its seeded stand-in reproduces: integer range,
  mean/std of floats, the share of True.
No tensor of the user's is stored: the CLI's `load_recorded` (debug/record.py) draws every input
from a seeded generator within those statistics, so ids stay in range and norm weights near their
values.  This half, the writing, is on the compile path (backend.py, vllm/), which is why it
lives here and not with the CLI's tools in debug/.

Recording must never change what the compiler does.  It runs mid-compile, where inputs may be
fake tensors of the compiler's fake mode (vLLM hands its pieces over with fake inputs): an op on
one of those (`.item()` for a statistic) would add a data-dependent symbol to the compile's shape
environment and break the passes after it.  So statistics are taken from real tensors only, sizes
are read as hints (None where data-dependent), and a graph directory appears only once complete.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.fx as fx

from ..config import ENV_DUMP, env_setting
from ..utils import copy_graph_module
from .graph_io import graph_to_data

SEED = 0  # the stand-ins' generator seed, written into inputs.json
DATA_DEPENDENT_SIZE = 1  # what a recorded data-dependent dim is replayed at


def dump_dir() -> Optional[str]:
    """KUNLUN_COMPILE_DUMP (read now), or None."""
    return env_setting(ENV_DUMP) or None


def _hint(size) -> Optional[int]:
    """The example value of a size; None for a data-dependent (unbacked) one, which has none."""
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw, has_guarding_hint

    if isinstance(size, torch.SymInt):
        return int(guarding_hint_or_throw(size)) if has_guarding_hint(size) else None
    return int(size)


def _is_plain(x: torch.Tensor) -> bool:
    """A tensor with data we may compute on: not fake, not meta, not a tensor subclass."""
    from torch._subclasses.fake_tensor import is_fake

    return type(x) in (torch.Tensor, torch.nn.Parameter) and not is_fake(x) and x.device.type != "meta"


def _stats(real: Optional[torch.Tensor]) -> Dict[str, Any]:
    if real is None or not _is_plain(real) or real.numel() == 0:
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
    shape = [_hint(s) for s in fake.shape]
    return {
        "kind": "tensor",
        "shape": shape,
        "stride": [_hint(s) for s in fake.stride()],
        "dtype": str(fake.dtype).replace("torch.", ""),
        "device": fake.device.type,
        "symbolic_dims": [d for d, s in enumerate(fake.shape) if isinstance(s, torch.SymInt) and shape[d] is not None],
        # sizes only known at run time (after nonzero, say): replayed at DATA_DEPENDENT_SIZE
        "data_dependent_dims": [d for d, s in enumerate(shape) if s is None],
        "parameter": is_parameter,
        "stats": _stats(real if isinstance(real, torch.Tensor) else None),
    }


def rank_dir(directory: str) -> str:
    """`directory`, or `directory/rank_R` in a torch.distributed group of more than one process
    (tensor-parallel workers compile the same graphs; each rank's stay apart)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return os.path.join(directory, f"rank_{dist.get_rank()}")
    return directory


def record_graph(directory: str, gm: fx.GraphModule, fake_inputs: Sequence[Any],
                 real_inputs: Optional[Sequence[Any]], static_indices: Sequence[int]) -> str:
    """Write one graph under `directory/graph_N` (the next free N; per rank, see `rank_dir`);
    returns that path."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # called mid-compile, where tensor ops would be faked; on a copy, so the graph the passes get
    # is the one the backend received, whatever the recorder does
    with unset_fake_temporarily():
        files = _files(copy_graph_module(gm), fake_inputs, real_inputs, static_indices)
    return _write_next(rank_dir(directory), files)


def _files(gm: fx.GraphModule, fake_inputs: Sequence[Any], real_inputs: Optional[Sequence[Any]],
           static_indices: Sequence[int]) -> Dict[str, Any]:
    """Everything a recorded graph is, in memory: nothing is written unless all of it could be made."""
    reals = list(real_inputs) if real_inputs is not None and len(real_inputs) == len(fake_inputs) else None
    static = set(static_indices)
    inputs = [describe_input(f, reals[i] if reals else None, i in static) for i, f in enumerate(fake_inputs)]
    data, constants = graph_to_data(gm)
    files = {"graph.py": gm.print_readable(print_output=False), "graph.json": json.dumps(data),
             "inputs.json": json.dumps({"torch": torch.__version__, "seed": SEED, "inputs": inputs}, indent=1)}
    if constants:
        files["constants.pt"] = constants
    return files


def _write_next(directory: str, files: Dict[str, Any]) -> str:
    """Write `files` into a hidden folder, then rename it to the next free `graph_N`: a reader (or a
    crash) never sees a half-written graph, and processes sharing `directory` never share an N."""
    import tempfile

    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".graph_tmp_", dir=directory)
    try:
        for name, content in files.items():
            if name.endswith(".pt"):
                torch.save(content, os.path.join(tmp, name))
            else:
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(content)
        n = 0
        while True:
            path = os.path.join(directory, f"graph_{n}")
            if not os.path.exists(path):
                try:
                    os.rename(tmp, path)  # fails if another process took N in between
                    return path
                except OSError:
                    if not os.path.isdir(path):
                        raise
            n += 1
    finally:
        if os.path.isdir(tmp):
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
