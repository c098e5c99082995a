"""The graph runtime: a compiled graph run as captured pieces, per capture set (size + parameters).

Modes (`graph_mode` option):
- `none`: the graph is called as it is.
- `piecewise`: split at splitting ops (runtime/splitting.py); the pieces between
  them are captured per size and replayed, the splitting ops run directly at
  the real size.
- `full`: the whole graph captured as one, when nothing in it forbids a capture
  (host syncs, CPU tensors, sizes other than the token count); otherwise run as it is.
- `full_and_piecewise`: the whole graph at capture sizes it exactly fits (as a
  uniform decode batch does), pieces otherwise (padded sizes, non-capturable ops).
- `auto` (default): `piecewise` on CUDA, `none` elsewhere.

Sizes: a token count that is a capture size runs at that size; one between two
capture sizes is padded up to the next, when every captured piece treats tokens
independently (runtime/token_dims.py; else it runs without a graph); one above
the largest capture size runs without a graph.  Outputs handed back are copies
when they live in graph memory, so a later replay cannot overwrite them (the
memory contract: runtime/__init__.py).
"""
from __future__ import annotations

import bisect
from typing import Any, Dict, List, Optional, Sequence, Set

import sympy
import torch
import torch.fx as fx

from ..graph_stats import count_kernels
from ..utils import warn_once
from .capture import WARM_UP, CapturedPiece, RuntimeCounters, SharedPool
from .capture_sets import CaptureSet, CaptureSets
from .checking import ReplayChecker
from .memory_plan import MemoryPlan, copy_outputs, plan_memory
from .precompile import precompile_fused_kernels
from .splitting import Piece, SplitGraph, SplitReason, input_view_nodes, split_graph, splitting_nodes
from .token_dims import SymbolBinder, evaluate, token_layout, token_symbol, why_not_token_wise

from ..config import GRAPH_MODES as MODES


MAX_PRECOMPILED_SIZES = 8  # sizes per graph whose fused kernels are compiled ahead (_precompile)


def resolve_mode(mode: str, on_cuda: bool) -> str:
    if mode not in MODES:
        raise ValueError(f"kunlun backend: graph_mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "piecewise" if on_cuda else "none"
    return mode


class _Plan:
    """One way of running the graph: its pieces, their runners, its memory plan, and whether it may pad."""

    def __init__(self, label: str, split: SplitGraph, runners: Dict[int, CapturedPiece], memory: MemoryPlan,
                 pad_refusal: Optional[str], refused: List[str]):
        self.label = label
        self.split = split
        self.runners = runners  # piece index -> runner (captured pieces only)
        self.memory = memory
        self.pad_refusal = pad_refusal  # None: padding is safe
        self.refused = refused  # graph pieces the memory plan keeps uncaptured, and why
        # The unpadded call's route, as list positions rather than names: a call runs every step
        # of it, so it does no dict work per value (a model's graph has dozens of inputs).
        slot = {name: i for i, name in enumerate(split.graph_inputs)}
        for piece in split.pieces:
            for name in piece.outputs:
                slot.setdefault(name, len(slot))
        self.slot_count = len(slot)
        self.steps = [(p, runners.get(p.index), [slot[n] for n in p.inputs], [slot[n] for n in p.outputs])
                      for p in split.pieces]
        self.outputs = [(slot[x], None) if isinstance(x, str) else (None, x) for x in split.graph_outputs]

    def run_unpadded(self, rt: "GraphRuntime", capture_set: CaptureSet, phase: str, args: Sequence[Any]) -> tuple:
        """A call at a capture size (or a static graph): every value at its real size."""
        values = list(args) + [None] * (self.slot_count - len(args))
        checker = rt.replay_checker(self, phase)
        for piece, runner, ins, outs in self.steps:
            piece_args = [values[i] for i in ins]
            if checker is not None:
                checker.before(piece, piece_args)
            if runner is None:
                results = piece.gm(*piece_args)
            else:
                results = rt.run_captured(runner, capture_set, phase, piece, piece_args)
            for i, v in zip(outs, results):
                values[i] = v
            if checker is not None:
                checker.after(piece, piece_args, results, runner is not None)
        outputs = [constant if i is None else values[i] for i, constant in self.outputs]
        if checker is not None:
            checker.finish(outputs)
        return tuple(copy_outputs(outputs, self.memory.output_copies))


class GraphRuntime:
    def __init__(self, name: str, gm: fx.GraphModule, example_inputs: Sequence[Any], static_input_indices: Set[int],
                 *, mode: str, capture_sizes: Sequence[int], splitting_ops: Sequence[str], max_captures: int,
                 check_replays: bool, warned: Set[str], strict: bool = False):
        self.name = name
        self.gm = gm
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.input_vals = [n.meta.get("val") for n in placeholders]
        self.bind_symbols = SymbolBinder(self.input_vals)
        self.on_cuda = _graph_device(example_inputs) == "cuda"
        self.mode = resolve_mode(mode, self.on_cuda)
        self.capture_sizes = sorted(set(int(s) for s in capture_sizes))
        self.sym = token_symbol(example_inputs)
        # a static graph serves one token count: dim 0 of its first non-parameter tensor input
        self.static_tokens = next((int(x.shape[0]) for i, x in enumerate(example_inputs)
                                   if isinstance(x, torch.Tensor) and x.dim() > 0 and i not in static_input_indices
                                   and isinstance(x.shape[0], int)), None) if self.sym is None else None
        self.static_input_indices = set(static_input_indices)
        self.parameter_names = frozenset(placeholders[i].name for i in self.static_input_indices
                                         if i < len(placeholders))
        self.strict = strict
        self.check_replays = check_replays
        self.replay_findings: Optional[List[Dict[str, Any]]] = None  # set: checks recorded here, not raised
        self.counters = RuntimeCounters()
        self.fallbacks: List[str] = []
        self.warned = warned
        self.pool = SharedPool()
        self.sets = CaptureSets(name, sorted(self.static_input_indices), max_captures, warned)
        self._runner_args = dict(use_cuda_graphs=self.on_cuda, pool=self.pool, counters=self.counters,
                                 warned=warned, fallbacks=self.fallbacks, on_host_sync=self._learn_sync)
        self.precompiled: Set[Any] = set()  # sizes whose kernels were compiled ahead (precompile.py)
        self.precompile_skips: List[str] = []  # fused calls that could not be made ahead, and why
        self.boundaries: List[str] = []
        self.piecewise: Optional[_Plan] = None
        self.full: Optional[_Plan] = None
        self.full_refusal: Optional[str] = None
        self.max_captures = max_captures
        self.splitting_ops = tuple(splitting_ops)
        # nodes found to sync with the host at a warm-up (custom ops no list names): split there next call
        self.found_syncs: Dict[str, str] = {}
        self._replan = False
        if self.mode != "none":
            self._build_plans()

    def _build_plans(self) -> None:
        gm = self.gm
        capturable = frozenset([self.sym]) if self.sym is not None else frozenset()
        reasons = splitting_nodes(gm, self.splitting_ops, "cuda" if self.on_cuda else "cpu", capturable)
        reasons.update(input_view_nodes(gm, self.parameter_names))
        for node in gm.graph.nodes:
            if node.name in self.found_syncs:
                reasons[node] = SplitReason("found_sync", self.found_syncs[node.name])
        hard = sorted({str(r) for r in reasons.values() if r.hard})
        self.piecewise = self.full = None
        self.full_refusal = None
        if self.mode in ("piecewise", "full_and_piecewise"):
            self.piecewise = self._plan("piecewise", split_graph(gm, reasons))
            self.boundaries = [p.describe() for p in self.piecewise.split.pieces] + self.piecewise.refused
        if self.mode in ("full", "full_and_piecewise"):
            if hard:
                self.full_refusal = f"the whole graph cannot be captured: {hard[0]}"
            else:
                views = {n: r for n, r in reasons.items() if r.kind == "input_view"}
                self.full = self._plan("full", split_graph(gm, views))
            if self.mode == "full":
                self.boundaries = [self.full_refusal] if self.full_refusal else \
                    [p.describe() for p in self.full.split.pieces] + self.full.refused

    def _learn_sync(self, node_name: str, why: str) -> bool:
        """A piece's warm-up found `node_name` syncing with the host: from the next call the graph is split
        there (and captured again); False when the node is not one of this graph's."""
        if node_name in self.found_syncs or not any(n.name == node_name for n in self.gm.graph.nodes):
            return False
        self.found_syncs[node_name] = why
        self._replan = True
        return True

    def _plan(self, label: str, split: SplitGraph) -> _Plan:
        candidates = {p.index for p in split.pieces if p.kind == "graph" and sum(count_kernels(p.gm).values())}
        memory = plan_memory(split, candidates, self.parameter_names)
        refused = [f"piece {i}: not captured, {why}" for i, why in sorted(memory.refusals.items())]
        for line in refused:
            warn_once(f"kunlun backend: {self.name}/{label} {line} (the memory plan cannot prove a capture of it "
                      "safe); it runs as plain code", self.warned)
        if memory.refusals:  # the homes of their values change: plan again without them
            candidates -= set(memory.refusals)
            memory = plan_memory(split, candidates, self.parameter_names)
        runners = {}
        pad_refusal = None
        for piece in split.pieces:
            if piece.index not in candidates:
                continue  # eager pieces, and pieces of views only, are called directly
            static = {i for i, name in enumerate(piece.inputs) if name in self.parameter_names}
            runners[piece.index] = CapturedPiece(f"{self.name}/{label}/piece_{piece.index}", piece.gm, static,
                                                 **self._runner_args)
            pad_refusal = pad_refusal or why_not_token_wise(piece.gm, self.sym)
        return _Plan(label, split, runners, memory, pad_refusal, refused)

    # ---- report ----------------------------------------------------------------------------------------
    def describe(self) -> dict:
        plan = self.piecewise or self.full
        return {
            "mode": self.mode,
            "graph_api": "cuda graphs" if self.on_cuda else "plain calls",
            "capture_sizes": list(self.capture_sizes),
            "pieces": self.boundaries,
            "padding": "off: " + plan.pad_refusal if plan and plan.pad_refusal else ("on" if plan else "off"),
            "full_graph": self.full_refusal or ("yes" if self.full else "no"),
            "counters": self.counters.as_dict(),
            "capture_failures": list(self.fallbacks),
            "split_at_host_syncs_found": dict(self.found_syncs),
            "kernels_compiled_ahead_for": len(self.precompiled),
            "precompile_skips": list(self.precompile_skips),
        }

    @property
    def piece_count(self) -> int:
        if self.piecewise is not None:
            return len(self.piecewise.split.pieces)
        return 1

    # ---- running -----------------------------------------------------------------------------------------
    def __call__(self, *args):
        if self.mode == "none":
            if self.on_cuda and len(self.precompiled) < MAX_PRECOMPILED_SIZES:
                bindings = self.bind_symbols(args)
                self._precompile(args, bindings, bindings.get(self.sym), None)
            return self.gm(*args)
        if self.graph_api_capturing():
            # the caller is capturing its own CUDA graph around us (a benchmark, vLLM's cudagraph
            # wrapper): ours cannot be replayed inside it, and the caller's graph removes the launch
            # overhead anyway, so the graph's kernels go straight into the caller's capture
            self.counters.uncaptured_runs += 1
            return self.gm(*args)
        if self._replan:  # split at the nodes found to sync; the captures made so far are dropped
            self._replan = False
            self._build_plans()
            self.sets = CaptureSets(self.name, sorted(self.static_input_indices), self.max_captures, self.warned)
        bindings = self.bind_symbols(args)
        tokens = bindings.get(self.sym) if self.sym is not None else None
        plan, size = self._choose(tokens)
        if plan is not None and not plan.runners:
            plan = None  # nothing in it is captured: the graph as it is, neither split nor padded
        self._precompile(args, bindings, tokens, size if plan is not None else None)
        if plan is None:
            self.counters.uncaptured_runs += 1
            return self.gm(*args)
        if plan is self.full:
            self.counters.full_graph_runs += 1
        else:
            self.counters.piecewise_runs += 1
        capture_set = self.sets.lookup(plan.label, size, args)
        if capture_set is None:
            self.counters.uncaptured_runs += 1
            return self.gm(*args)
        phase = capture_set.next_phase()
        if tokens is not None and size != tokens:
            self.counters.padded_runs += 1
        if tokens is None or size == tokens:
            return plan.run_unpadded(self, capture_set, phase, args)
        return _Call(self, plan, capture_set, phase, bindings, tokens, size).run(args)

    def run_captured(self, runner: CapturedPiece, capture_set: CaptureSet, phase: str, piece: Piece,
                     args: Sequence[Any]):
        """One captured piece's step of a call.  If it fails, that piece runs as plain code for this call
        (one warning); an error that the plain piece raises too is the caller's, and reaches them."""
        try:
            return runner.run(capture_set.id, phase, args)
        except Exception as e:  # noqa: BLE001 - the smallest unit that failed falls back, for this call
            if self.strict:
                raise
            out = piece.gm(*args)  # raises the caller's error when the input itself is bad
            reason = f"{type(e).__name__}: {str(e)[:200]}"
            self.counters.piece_fallbacks += 1
            self.fallbacks.append(f"{runner.name}: failed at run time ({phase}), ran uncaptured: {reason}")
            warn_once(f"kunlun backend: {runner.name} failed at run time and ran uncaptured for this call: "
                      f"{reason}", self.warned)
            return out

    def replay_checker(self, plan: "_Plan", phase: str) -> Optional[ReplayChecker]:
        """With check_replays, or `replay_findings` set (the CLI's align): the checker of one call (replays
        and captures only)."""
        if not (self.check_replays or self.replay_findings is not None) or phase == WARM_UP:
            return None
        return ReplayChecker(self.name, self.replay_findings)

    def _precompile(self, args: Sequence[Any], bindings: Dict[sympy.Symbol, int], tokens: Optional[int],
                    padded_size: Optional[int]) -> None:
        """Before the first call at a size: the graph's fused kernels compiled in parallel, at the token
        count the pieces will run (the padded size), so the call itself finds them compiled.  Keyed by the
        size the kernels see — a hot path: nothing is built for a size already done."""
        # the first sizes compile most specializations (plans change at a few size boundaries); later new
        # sizes (a server's prefill lengths) would pay a walk over the graph each for little: they compile
        # at their launches, as without this
        if not self.on_cuda or len(self.precompiled) >= MAX_PRECOMPILED_SIZES:
            return
        key = padded_size if padded_size is not None else ("unpadded", tokens)
        if key in self.precompiled:
            return
        self.precompiled.add(key)
        if padded_size is not None and self.sym is not None and self.sym in bindings:
            bindings = {**bindings, self.sym: padded_size}
        skipped: List[str] = []
        precompile_fused_kernels(self.gm, args, self.static_input_indices, bindings, on_skip=skipped.append)
        self.precompile_skips.extend(skipped)

    @staticmethod
    def graph_api_capturing() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def _choose(self, tokens: Optional[int]):
        """(plan, size to run the captured pieces at), or (None, None) for a plain call."""
        largest = self.capture_sizes[-1] if self.capture_sizes else 0
        if tokens is None:  # a static graph: its one size is the key
            plan = self.full or self.piecewise
            if plan is None or (self.static_tokens is not None and self.static_tokens > largest):
                return None, None
            return plan, 0
        if tokens < 1 or tokens > largest:
            return None, None
        exact = tokens in self.capture_sizes
        if exact and self.full is not None:
            return self.full, tokens
        if self.piecewise is None:
            return None, None  # full mode, size needs padding: the whole graph cannot be padded (attention)
        if exact:
            return self.piecewise, tokens
        if self.piecewise.pad_refusal:
            return None, None
        return self.piecewise, self.capture_sizes[bisect.bisect_left(self.capture_sizes, tokens)]


class _Call:
    """One padded call through a plan: values tracked by name, padded for captured pieces, real for the rest."""

    def __init__(self, rt: GraphRuntime, plan: _Plan, capture_set: CaptureSet, phase: str,
                 bindings: Dict[sympy.Symbol, int], tokens: int, size: int):
        self.rt, self.plan, self.capture_set, self.phase = rt, plan, capture_set, phase
        self.tokens, self.size = tokens, size
        self.real_bindings = bindings
        self.padded_bindings = dict(bindings)
        if rt.sym is not None:
            self.padded_bindings[rt.sym] = size
        self.values: Dict[str, Any] = {}
        self.vals: Dict[str, Any] = {}  # name -> meta val
        self.padded: Set[str] = set()  # values at the padded size
        self._pad_cache: Dict[str, Any] = {}

    def run(self, args):
        split = self.plan.split
        checker = self.rt.replay_checker(self.plan, self.phase)
        for name, value, val in zip(split.graph_inputs, args, self.rt.input_vals):
            self.values[name], self.vals[name] = value, val
        for piece in split.pieces:
            runner = self.plan.runners.get(piece.index)
            if runner is not None:
                piece_args = [self._padded(n) for n in piece.inputs]
                if checker is not None:
                    checker.before(piece, piece_args)
                outs = self.rt.run_captured(runner, self.capture_set, self.phase, piece, piece_args)
            else:
                piece_args = [self._real(n) for n in piece.inputs]
                if checker is not None:
                    checker.before(piece, piece_args)
                outs = piece.gm(*piece_args)
            self._store(piece, outs, padded=runner is not None)
            if checker is not None:
                checker.after(piece, piece_args, outs, runner is not None)
        outputs = [self._real(x) if isinstance(x, str) else x for x in split.graph_outputs]
        if checker is not None:
            checker.finish(outputs)
        return tuple(copy_outputs(outputs, self.plan.memory.output_copies))

    def _store(self, piece: Piece, outs, padded: bool) -> None:
        for name, value, val in zip(piece.outputs, outs, piece.output_vals):
            self.values[name], self.vals[name] = value, val
            if padded:
                self.padded.add(name)

    def _padded(self, name: str):
        value, val = self.values[name], self.vals[name]
        if name in self.padded:
            return value
        if name in self._pad_cache:
            return self._pad_cache[name]
        if isinstance(val, torch.SymInt):
            out = evaluate(val, self.padded_bindings)
        elif isinstance(value, torch.Tensor):
            out = value
            for d, per_token in token_layout(val, self.rt.sym):
                out = out.index_select(d, _padding_index(self.tokens, self.size, per_token, value.device))
        else:
            out = value
        self._pad_cache[name] = out
        return out

    def _real(self, name: str):
        value, val = self.values[name], self.vals[name]
        if name not in self.padded:
            return value
        if isinstance(value, torch.Tensor):
            for d, per_token in token_layout(val, self.rt.sym):
                value = value.narrow(d, 0, self.tokens * per_token)
            return value
        if isinstance(val, torch.SymInt):
            return evaluate(val, self.real_bindings)
        return value


def _padding_index(tokens: int, size: int, per_token: int, device) -> torch.Tensor:
    """Rows of a padded value: the real ones, then the last real token's rows repeated (ids, positions
    and activations of a real token stay in range)."""
    rows = torch.arange(size * per_token, device=device)
    last = (tokens - 1) * per_token + rows % per_token
    return torch.where(rows < tokens * per_token, rows, last)


def _graph_device(example_inputs: Sequence[Any]) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.device.type != "meta":
            if x.device.type == "cuda":
                return "cuda"
    return "cpu"
