"""What a transformed graph is known by across processes: the warm-start cache's key.

The passes are a function of the ATen graph they receive (its nodes and constants, its inputs'
dtypes, devices, symbolic shapes and strides, and what the shape environment knows of each
symbol: range and example value), of the options and of the code that runs them (our version
and source, torch, triton, vLLM).  The key is a hash of all of these; the parts are kept next to
each entry, so a mismatch can be named ("torch 2.12.0 -> 2.13.0") rather than just missed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
from typing import Dict, List, Sequence

import torch
import torch.fx as fx

from ..capture.graph_io import graph_to_data
from ..config import CompileConfig
from ..utils import options_key

FORMAT = 1  # of the key and of the stored entries (graph_store.py); bump when either changes


class NotCacheable(Exception):
    """This graph cannot be keyed (or stored): it is compiled every time."""


def key_components(gm: fx.GraphModule, config: CompileConfig, pass_names: Sequence[str]) -> Dict[str, str]:
    """Everything the passes' output depends on, as named strings (hashes for the large parts)."""
    try:
        data, constants = graph_to_data(gm)
    except ValueError as e:  # a target or argument graph_io does not serialise
        raise NotCacheable(str(e)) from e
    graph = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    for name in sorted(constants):
        graph.update(name.encode())
        graph.update(tensor_digest(constants[name]).encode())
    return {
        "format": str(FORMAT),
        "kunlun": options_key(config.as_dict()),  # package version, source fingerprint, options
        "passes": ",".join(pass_names),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "vllm": _vllm_version(),
        "python": platform.python_version(),
        "graph": graph.hexdigest(),
        "inputs": hashlib.sha256(json.dumps(describe_inputs(gm)).encode()).hexdigest(),
    }


def key_of(components: Dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:32]


def differences(stored: Dict[str, str], current: Dict[str, str]) -> List[str]:
    """The parts that differ, readable: versions as 'a -> b', hashed parts by name."""
    out = []
    for name in sorted(set(stored) | set(current)):
        a, b = stored.get(name), current.get(name)
        if a == b:
            continue
        if name in ("graph", "inputs", "kunlun"):
            what = {"graph": "the graph differs", "inputs": "the input shapes/dtypes differ",
                    "kunlun": "other kunlun_compile code or options"}[name]
            out.append(what)
        else:
            out.append(f"{name} {a} -> {b}")
    return out


def describe_inputs(gm: fx.GraphModule) -> list:
    """Each placeholder's meta value (dtype, device, symbolic shape and strides), then what the shape
    environment knows of the symbols in them."""
    vals = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if "val" not in node.meta:
            raise NotCacheable(f"input {node.name} has no meta value")
        vals.append(node.meta["val"])
    described, symbols, shape_env = [], set(), None
    for v in vals:
        if isinstance(v, torch.Tensor):
            sizes = [*v.shape, *v.stride(), v.storage_offset()]
            described.append(["tensor", str(v.dtype), v.device.type, [str(s) for s in sizes]])
        elif isinstance(v, torch.SymInt):
            sizes = [v]
            described.append(["symint", str(v.node.expr)])
        elif isinstance(v, (bool, int, float)) or v is None:
            sizes = []
            described.append([type(v).__name__, repr(v)])
        else:
            raise NotCacheable(f"an input of type {type(v).__name__}")
        for s in sizes:
            if isinstance(s, torch.SymInt):
                shape_env = s.node.shape_env
                symbols |= s.node.expr.free_symbols
    facts = []
    for sym in sorted(symbols, key=str):
        facts.append([str(sym), str(shape_env.var_to_range.get(sym)), str(shape_env.var_to_val.get(sym))])
    return [described, facts]


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


@functools.lru_cache(maxsize=1)
def _vllm_version() -> str:
    from .compat import vllm_version

    return vllm_version()
