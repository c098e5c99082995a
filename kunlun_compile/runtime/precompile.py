"""Compile a graph's Triton kernels in parallel before its first run at a size.

Run as they come, the `kunlun::` ops' kernels compile one after another in the
first call (each compile is seconds of ptxas and a launcher build on an empty
cache; v11 measured ~3 s of serial JIT for the 12-14 kernels of a tiny model).
Here every `kunlun::` call of the graph is made once with inputs allocated from
the nodes' meta values (parameters and buffers: the real ones), inside
`compiling_only`: each launch submits its compile to a thread pool and runs
nothing, so the compiles overlap and no value depends on the garbage the calls
return — only shapes, strides and dtypes reach the kernels' specializations,
and no ATen op runs on it.  Then the real first call finds the kernels
compiled.  Best effort: a call that fails here is skipped (its kernel
compiles at its real launch as before).
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Set, Tuple

import sympy
import torch
import torch.fx as fx

from ..config import ENV_JIT_WORKERS, env_setting
from ..graph_stats import kernel_kind
from ..triton_kernel import compiling_only
from .token_dims import evaluate


def _is_fused_op(node: fx.Node) -> bool:
    """A `kunlun::` call: a fused op or a generated element-wise kernel (graph_stats' kinds)."""
    return node.op == "call_function" and kernel_kind(node) != "aten"


def _concrete(size: Any, bindings: Dict[sympy.Symbol, int]) -> int:
    value = evaluate(size, bindings)
    return int(size) if value is None else value


def _materialize(val: Any, bindings: Dict[sympy.Symbol, int]) -> Any:
    """A real value shaped like the meta value `val` under `bindings` (tensors uninitialized)."""
    if isinstance(val, torch.Tensor):
        return torch.empty_strided([_concrete(s, bindings) for s in val.shape],
                                   [_concrete(s, bindings) for s in val.stride()], dtype=val.dtype, device=val.device)
    if isinstance(val, torch.SymInt):
        return evaluate(val, bindings)
    if isinstance(val, (list, tuple)):
        return type(val)(_materialize(v, bindings) for v in val)
    return val


def _workers() -> int:
    return env_setting(ENV_JIT_WORKERS)  # default min(16, cores)


def fused_calls(gm: fx.GraphModule, args: Sequence[Any], static_positions: Set[int],
                bindings: Dict[sympy.Symbol, int]) -> Iterator[Tuple[fx.Node, Any, Any]]:
    """(node, args, kwargs) of each `kunlun::` call in `gm`, with values shaped as the run under `bindings`
    will have them: the graph inputs at `static_positions` (parameters, buffers) are `args`' own, every
    other tensor is allocated, uninitialized, from its node's meta value.  A call whose values cannot be
    built yields the exception instead of its args."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    real = {n: args[i] for i, n in enumerate(placeholders) if i in static_positions and i < len(args)}

    def value(n: fx.Node) -> Any:
        if n in real:
            return real[n]
        if "val" not in n.meta:
            raise LookupError(f"{n.name} has no meta value")
        return _materialize(n.meta["val"], bindings)

    for node in gm.graph.nodes:
        if not _is_fused_op(node):
            continue
        try:
            call_args, call_kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            yield node, e, None
            continue
        yield node, call_args, call_kwargs


def precompile_fused_kernels(gm: fx.GraphModule, args: Sequence[Any], static_positions: Set[int],
                             bindings: Dict[sympy.Symbol, int], on_skip: Optional[Callable[[str], None]] = None) -> int:
    """Compile the kernels of every `kunlun::` call in `gm` for the sizes `bindings` gives, in parallel
    (`fused_calls`; nothing runs).  Returns the number of calls made."""
    workers = _workers()
    if workers < 2:
        return 0
    calls = 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, compiling_only(pool):
        for node, call_args, call_kwargs in fused_calls(gm, args, static_positions, bindings):
            try:
                if isinstance(call_args, Exception):
                    raise call_args
                node.target(*call_args, **call_kwargs)
                calls += 1
            except Exception as e:  # noqa: BLE001 - best effort: the kernel compiles at its real launch instead
                if on_skip is not None:
                    on_skip(f"{node.name}: {type(e).__name__}: {str(e)[:120]}")
    return calls
