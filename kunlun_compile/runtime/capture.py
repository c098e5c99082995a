"""One piece, captured once per capture set and replayed.

A capture set (runtime/capture_sets.py) is a size plus the addresses of the
graph's parameters; it walks all its pieces together through warm-up (first
call: plain, so lazy initialisation and Triton compilation happen outside a
capture), capture (second call) and replay (every later call: inputs copied into
the capture's buffers, one `replay()`).  Parameters and buffers are read in
place, which is why their addresses are part of the set's key.

The device decides the graph API: CUDA graphs on CUDA (one memory pool shared by
every piece and size of a compiled graph), plain calls elsewhere, so everything
but the capture itself runs and is tested on the CPU.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

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
    piece_fallbacks: int = 0  # calls in which a captured piece failed and ran uncaptured

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
    """A piece's capture in one capture set."""
    graph: Any = None  # torch.cuda.CUDAGraph, or the plain-call marker
    static_inputs: List[Any] = dataclasses.field(default_factory=list)
    static_outputs: Any = None
    copies: List[Any] = dataclasses.field(default_factory=list)  # InputCopy per non-parameter tensor input


PLAIN = "plain call"
WARM_UP, CAPTURE, REPLAY = "warm-up", "capture", "replay"


class CapturedPiece:
    """One graph piece.  `run(set_id, phase, args)`: the capture set (runtime/capture_sets.py) decides
    the phase, so every piece of a set is warmed up, captured and replayed in the call order."""

    def __init__(self, name: str, gm: fx.GraphModule, static_positions: Set[int], *, use_cuda_graphs: bool,
                 pool: SharedPool, counters: RuntimeCounters, warned: Set[str], fallbacks: List[str],
                 on_host_sync: Optional[Callable[[str, str], bool]] = None):
        self.name = name
        # told the name of a node found to sync with the host at warm-up; True: the runtime will split
        # the graph there (no warning needed), False: this piece gives up capturing
        self.on_host_sync = on_host_sync
        self.gm = gm
        self.static_positions = static_positions  # argument positions holding parameters/buffers
        self.use_cuda_graphs = use_cuda_graphs
        self.pool = pool
        self.counters = counters
        self.warned = warned
        self.fallbacks = fallbacks
        self.entries: Dict[int, _Entry] = {}  # capture set id -> capture
        self.broken: Optional[str] = None  # why this piece runs uncaptured from now on

    def run(self, set_id: int, phase: str, args: Sequence[Any]):
        if self.broken:
            self.counters.uncaptured_runs += 1
            return self.gm(*args)
        if phase == WARM_UP:
            if not self.use_cuda_graphs:
                return self.gm(*args)
            out, culprit = run_checking_host_syncs(self.gm, args)
            if culprit is not None:
                why = f"{culprit.name} ({culprit.target}) syncs with the host"
                if self.on_host_sync is not None and self.on_host_sync(culprit.name, why):
                    self.broken = why  # until the runtime splits the graph at that node
                else:
                    self._give_up(why, None)
                return self.gm(*args)
            return out
        entry = self.entries.get(set_id)
        if entry is None:
            if phase == REPLAY:  # not captured in its set's capture call (it was broken then)
                self.counters.uncaptured_runs += 1
                return self.gm(*args)
            entry = self.entries[set_id] = _Entry()
            return self._capture(entry, args)
        return self._replay(entry, args)

    # ---- capture ---------------------------------------------------------------------------------------
    def _capture(self, entry: _Entry, args: Sequence[Any]):
        try:
            entry.static_inputs, entry.copies = self._static_inputs(args)
        except ValueError as e:
            self._give_up(str(e), None)
            return self.gm(*args)
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

    def _static_inputs(self, args: Sequence[Any]) -> Tuple[List[Any], List["InputCopy"]]:
        """What the capture reads: parameters and non-tensors as they are, every other tensor from a buffer
        of its own that each replay refills."""
        seen, copies = [], []
        for i, a in enumerate(args):
            if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
                raise ValueError(f"input {i} is a list of tensors, which a capture would read as they were at capture")
            if i in self.static_positions or not isinstance(a, torch.Tensor):
                seen.append(a)
                continue
            buf, copy = static_buffer_like(a, i)
            seen.append(buf)
            copies.append(copy)
        return seen, copies

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
        targets, sources = [], []
        for copy in entry.copies:
            a = args[copy.position]
            source = copy.source(a) if copy.broadcast_dims else a
            if source is None:  # broadcast at capture, not now: this call cannot use the capture
                self.counters.uncaptured_runs += 1
                return self.gm(*args)
            if source is not copy.target:
                targets.append(copy.target)
                sources.append(source)
        if len(targets) == 1:
            targets[0].copy_(sources[0])
        elif targets:  # one launch per dtype instead of one per input (token ids and positions: one)
            torch._foreach_copy_(targets, sources)
        self.counters.replays += 1
        if entry.graph is PLAIN:
            return self.gm(*entry.static_inputs)
        entry.graph.replay()
        return entry.static_outputs


@dataclasses.dataclass
class InputCopy:
    """How one input reaches a capture: copied into `target` before every replay.  `broadcast_dims`:
    dims the input had stride 0 on at capture; the buffer stores one element along them, so an input
    must still be broadcast there to be copied (else the call runs uncaptured)."""
    position: int
    target: torch.Tensor
    broadcast_dims: Tuple[int, ...] = ()

    def source(self, a: torch.Tensor) -> Optional[torch.Tensor]:
        for d in self.broadcast_dims:
            if a.stride(d) != 0:
                return None
            a = a.narrow(d, 0, 1)
        return a


def static_buffer_like(a: torch.Tensor, position: int = 0) -> Tuple[torch.Tensor, InputCopy]:
    """(the tensor a capture reads an input from, how to refill it): the input's own sizes and strides
    (the piece was compiled for them, and a kernel may rely on them), filled with its values.  Stride-0
    (broadcast) dims keep stride 0 over one stored element.  Other self-overlapping layouts are refused
    (ValueError): a buffer with them cannot be written element by element."""
    broadcast = tuple(d for d, (n, st) in enumerate(zip(a.shape, a.stride())) if st == 0 and n > 1)
    base = a
    for d in broadcast:
        base = base.narrow(d, 0, 1)
    if not _non_overlapping(base):
        raise ValueError(f"input {position} has a self-overlapping layout (strides {tuple(a.stride())})")
    buf = torch.empty_strided(base.shape, base.stride(), dtype=a.dtype, device=a.device)
    buf.copy_(base)
    seen = buf.expand(a.shape) if broadcast else buf
    return seen, InputCopy(position, buf, broadcast)


def _non_overlapping(t: torch.Tensor) -> bool:
    """No two elements share memory: with dims sorted by stride, each stride covers the dims below it."""
    extent = 1
    for n, st in sorted(((n, st) for n, st in zip(t.shape, t.stride()) if n > 1), key=lambda x: x[1]):
        if st < extent:
            return False
        extent = st * n
    return True


def run_checking_host_syncs(gm: fx.GraphModule, args: Sequence[Any]):
    """Run `gm` node by node with CUDA's sync debug mode set to raise: (outputs, None), or
    (None, node): the first node that synchronizes with the host (`.item()`,
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
        return None, interp.current
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class _Recorder(fx.Interpreter):
    current: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)

