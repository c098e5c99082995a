"""One piece, captured once per size and replayed.

`CapturedPiece.run(size, args)` walks a size through warm-up (first call: plain,
so lazy initialisation and Triton compilation happen outside a capture), capture
(second call) and replay (every later call: inputs copied into the capture's
static buffers, one `replay()`).  Parameters and buffers are not copied: their
addresses are fixed, and the debug mode checks that they did not move.

The device decides the graph API: CUDA graphs on CUDA (one memory pool shared by
every piece and size of a compiled graph), plain calls elsewhere, so everything
but the capture itself runs and is tested on the CPU.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Set

import torch
import torch.fx as fx

from ..utils import warn_once


@dataclasses.dataclass
class RuntimeCounters:
    captures: int = 0
    replays: int = 0
    padded_runs: int = 0
    uncaptured_runs: int = 0
    full_graph_runs: int = 0
    piecewise_runs: int = 0
    capture_failures: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class SharedPool:
    """The memory pool of one compiled graph (CUDA), created on first use."""

    def __init__(self):
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


@dataclasses.dataclass
class _Entry:
    calls: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph, or the plain-call marker
    static_inputs: List[Any] = dataclasses.field(default_factory=list)
    static_outputs: Any = None
    static_addresses: Dict[int, int] = dataclasses.field(default_factory=dict)


PLAIN = "plain call"


class CapturedPiece:
    def __init__(self, name: str, gm: fx.GraphModule, static_positions: Set[int], *, use_cuda_graphs: bool,
                 pool: SharedPool, counters: RuntimeCounters, max_captures: int, check_addresses: bool,
                 warned: Set[str], fallbacks: List[str]):
        self.name = name
        self.gm = gm
        self.static_positions = static_positions  # argument positions holding parameters/buffers
        self.use_cuda_graphs = use_cuda_graphs
        self.pool = pool
        self.counters = counters
        self.max_captures = max_captures
        self.check_addresses = check_addresses
        self.warned = warned
        self.fallbacks = fallbacks
        self.entries: Dict[int, _Entry] = {}
        self.broken: Optional[str] = None  # why this piece runs uncaptured from now on

    def run(self, size: int, args: Sequence[Any]):
        if self.broken:
            self.counters.uncaptured_runs += 1
            return self.gm(*args)
        entry = self.entries.get(size)
        if entry is None:
            if len(self.entries) >= self.max_captures:
                warn_once(f"kunlun backend: {self.name} reached max_captures_per_piece={self.max_captures}; "
                          f"sizes not captured yet run without a graph", self.warned)
                self.counters.uncaptured_runs += 1
                return self.gm(*args)
            entry = self.entries[size] = _Entry()
        entry.calls += 1
        if entry.calls == 1:  # warm-up
            if not self.use_cuda_graphs:
                return self.gm(*args)
            out, culprit = run_checking_host_syncs(self.gm, args)
            if culprit is not None:
                self._give_up(f"{culprit} syncs with the host", None)
                return self.gm(*args)
            return out
        if entry.graph is None:
            return self._capture(entry, args)
        return self._replay(entry, args)

    # ---- capture ---------------------------------------------------------------------------------------
    def _capture(self, entry: _Entry, args: Sequence[Any]):
        entry.static_inputs = [a if (i in self.static_positions or not isinstance(a, torch.Tensor))
                               else a.clone() for i, a in enumerate(args)]
        entry.static_addresses = {i: a.data_ptr() for i, a in enumerate(args)
                                  if i in self.static_positions and isinstance(a, torch.Tensor)}
        if not self.use_cuda_graphs:
            entry.graph = PLAIN
            self.counters.captures += 1
            return self._replay(entry, args)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool.handle()):
                entry.static_outputs = self.gm(*entry.static_inputs)
        except Exception as e:  # noqa: BLE001 - a piece that cannot be captured runs without a graph
            self._give_up(f"capture failed: {type(e).__name__}: {str(e)[:200]}", e)
            return self.gm(*args)
        entry.graph = graph
        self.counters.captures += 1
        return self._replay(entry, args)

    def _give_up(self, reason: str, error: Optional[Exception]) -> None:
        if error is not None:
            torch.cuda.synchronize()
        self.broken = reason
        self.counters.capture_failures += 1
        self.fallbacks.append(f"{self.name}: {reason}")
        warn_once(f"kunlun backend: {self.name} cannot be captured ({reason}); it runs without a graph, "
                  f"outputs stay correct", self.warned)
        self.entries.clear()

    # ---- replay ----------------------------------------------------------------------------------------
    def _replay(self, entry: _Entry, args: Sequence[Any]):
        if self.check_addresses:
            for i, ptr in entry.static_addresses.items():
                if args[i].data_ptr() != ptr:
                    raise RuntimeError(f"kunlun backend: {self.name} input {i} (a parameter/buffer) moved since "
                                       f"capture ({ptr:#x} -> {args[i].data_ptr():#x}); the graph would read "
                                       "stale memory")
        targets, sources = [], []
        for i, (static, a) in enumerate(zip(entry.static_inputs, args)):
            if i not in self.static_positions and isinstance(a, torch.Tensor) and static.data_ptr() != a.data_ptr():
                targets.append(static)
                sources.append(a)
        if len(targets) == 1:
            targets[0].copy_(sources[0])
        elif targets:  # one launch per dtype instead of one per input (token ids and positions: one)
            torch._foreach_copy_(targets, sources)
        self.counters.replays += 1
        if entry.graph is PLAIN:
            return self.gm(*entry.static_inputs)
        entry.graph.replay()
        return entry.static_outputs


def run_checking_host_syncs(gm: fx.GraphModule, args: Sequence[Any]):
    """Run `gm` node by node with CUDA's sync debug mode set to raise: (outputs, None), or
    (None, "node (op)") naming the first node that synchronizes with the host (`.item()`,
    `nonzero`, a device-to-host copy), which a capture could not contain.  Found this way,
    before any capture starts, a failed capture never leaves the CUDA RNG mid-capture."""
    interp = _Recorder(gm)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return interp.run(*args), None
    except RuntimeError as e:
        if "synchroniz" not in str(e) or interp.current is None:
            raise
        node = interp.current
        return None, f"{node.name} ({node.target})"
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class _Recorder(fx.Interpreter):
    current: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)

