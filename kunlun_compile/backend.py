"""The torch.compile backend: capture -> passes -> (lowering) -> runtime.

`KunlunBackend` is one configured backend; calling it with Dynamo's graph and
example inputs returns the callable Dynamo runs.  Every graph it compiles
leaves a `GraphReport` in `backend.report`.  Any failure in a stage is caught
here or in the stage wrapper: one warning naming the graph and stage, and the
graph runs correctly without that stage (strict=True raises instead).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from .capture.recompiles import DYNAMO_LOGGER, describe_hit, parse_limit_warning
from .capture.record import dump_dir, record_graph
from .capture import needs_autograd, static_input_indices, to_aten_inference, with_serving_shapes
from .config import CompileConfig
from .graph_stats import count_kernels, generated_kernels
from .lowering import describe_kernels, get_target
from .passes import GraphPass, PassContext, PassManager, default_passes
from .report import CompileReport, Fallback, GraphReport
from .runtime import GraphExecutor, GraphRuntime
from .runtime.checking import ReplayCheckError
from .runtime.executor import SizeAssumptionBroken
from .utils import copy_graph_module, describe_value, warn_once


class KunlunBackend:
    """A configured backend; pass it as `torch.compile(model, backend=...)`."""

    __name__ = "kunlun"

    def __init__(self, config: Optional[CompileConfig] = None, passes: Optional[Sequence[GraphPass]] = None):
        self.config = config or CompileConfig.from_options()
        self.pass_manager = PassManager(default_passes() if passes is None else passes)
        self.pass_manager.check_disabled(self.config)
        self.report = CompileReport()
        self.runtimes: Dict[str, GraphRuntime] = {}  # graph name -> its runtime (the CLI's align reads them)
        self.warned: set = set()
        self._ids = itertools.count()

    def __deepcopy__(self, memo):
        # `compile()` hangs the backend on the model (`model.kunlun_backend`); copying the model
        # (e.g. for a float64 reference) must not copy compiled graphs holding fake tensors
        return self

    # Dynamo calls this once per captured graph.
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
        if kwargs:
            raise TypeError(f"kunlun backend: unexpected arguments {sorted(kwargs)}; "
                            "give options as torch.compile(..., options={...})")
        name = f"graph_{next(self._ids)}"
        if needs_autograd(example_inputs):
            warn_once("kunlun backend: this is an inference backend; graphs that need gradients "
                      "(grad mode on and inputs or parameters with requires_grad) run eagerly. "
                      "Use torch.no_grad()/torch.inference_mode() to compile them.", self.warned)
            self.report.graphs.append(GraphReport(name, [describe_value(x) for x in example_inputs],
                                                  mode="eager-grad"))
            return gm.forward
        # what AOTAutograd will pass as graph inputs, as real values: the graph's own parameters and
        # buffers first, then Dynamo's inputs (the recorder takes its statistics from them)
        real_inputs = [*dict(gm.named_parameters(remove_duplicate=False)).values(),
                       *dict(gm.named_buffers(remove_duplicate=False)).values(), *example_inputs]
        try:
            compiled = to_aten_inference(gm, example_inputs,
                                         lambda g, inputs: self._compile_aten(name, g, inputs, real_inputs))
            return self._with_eager_fallback(name, compiled, gm.forward)
        except torch._dynamo.exc.RestartAnalysis:
            raise  # Dynamo's signal to re-trace (e.g. a float it wants constant): not a failure
        except Exception as e:  # noqa: BLE001 - a failed capture runs the graph eagerly, never breaks the model
            if self.config.strict:
                raise
            reason = f"{type(e).__name__}: {e}"
            warn_once(f"kunlun backend: capture of {name} failed; it runs eagerly: {reason}", self.warned)
            report = GraphReport(name, [describe_value(x) for x in example_inputs], mode="eager-fallback")
            report.fallbacks.append(Fallback(name, "capture", reason))
            self.report.graphs.append(report)
            return gm.forward

    def _with_eager_fallback(self, name: str, compiled: Callable, eager: Callable) -> Callable:
        """`compiled`, and when it raises, Dynamo's graph run eagerly for that call.  The ATen graph's own
        fallback (runtime/executor.py) shares its capture's assumptions; this one does not: a size traced
        size-obliviously as not 1 (a squeeze of a batch of one) is only right in the torch-level graph.
        An error the eager graph raises too is the caller's, and reaches them."""
        strict, warned, report = self.config.strict, self.warned, self.report

        def run(*args):
            try:
                return compiled(*args)
            except (ReplayCheckError, SizeAssumptionBroken):
                raise  # a check that found the compiled graph wrong; Dynamo's graph shares the assumption
            except Exception as e:  # noqa: BLE001 - never a crash inside the user's model that eager avoids
                if strict:
                    raise
                out = eager(*args)
                reason = f"{type(e).__name__}: {str(e)[:200]}"
                warn_once(f"kunlun backend: {name} failed in its compiled form and ran eagerly for this call: "
                          f"{reason}", warned)
                graph = next((g for g in report.graphs if g.name == name), None)
                if graph is not None:
                    graph.fallbacks.append(Fallback(name, "run", f"ran eagerly for one call: {reason}"))
                return out
        return run

    def _compile_aten(self, name: str, gm: fx.GraphModule, example_inputs: List[Any],
                      real_inputs: Optional[List[Any]] = None) -> Callable:
        t0 = time.perf_counter()
        report = GraphReport(name, [describe_value(x) for x in example_inputs])
        self._record(name, gm, example_inputs, real_inputs, report)
        report.kernels_before = count_kernels(gm)
        uncompiled = copy_graph_module(gm)  # what runs if a later stage fails
        ctx = PassContext(self.config, name, self.warned)
        gm = self.pass_manager.run(gm, ctx, report, keep_code=self.config.report)
        report.kernels = count_kernels(gm)
        self._describe_generated(gm, report)
        run = self._runtime(name, gm, example_inputs, report)
        report.compile_ms = (time.perf_counter() - t0) * 1e3
        self.report.graphs.append(report)
        return GraphExecutor(name, run, uncompiled, strict=self.config.strict, report=report, warned=self.warned)

    def _record(self, name: str, gm: fx.GraphModule, example_inputs, real_inputs, report: GraphReport) -> None:
        """With KUNLUN_COMPILE_DUMP=DIR: write the graph as received (capture/record.py)."""
        directory = self.config.dump_dir or dump_dir()
        if not directory:
            return
        try:
            report.recorded_at = record_graph(directory, gm, example_inputs, real_inputs, static_input_indices())
        except Exception as e:  # noqa: BLE001 - recording is a debugging aid; never fail the compile over it
            warn_once(f"kunlun backend: could not record {name} under {directory}: {type(e).__name__}: {e}",
                      self.warned)

    def _describe_generated(self, gm: fx.GraphModule, report: GraphReport) -> None:
        report.generated = describe_kernels(generated_kernels(gm), get_target(self.config.target),
                                            with_source=self.config.report)
        report.vector_ops = sum(g["vector_ops"] for g in report.generated)
        report.sfu_ops = sum(g["sfu_ops"] for g in report.generated)

    def _runtime(self, name: str, gm: fx.GraphModule, example_inputs: List[Any], report: GraphReport) -> Callable:
        """The graph runtime around the compiled graph; if building it fails, the graph runs as it is."""
        cfg = self.config
        try:
            rt = GraphRuntime(name, gm, example_inputs, set(static_input_indices()), mode=cfg.graph_mode,
                              capture_sizes=cfg.capture_sizes, splitting_ops=cfg.splitting_ops,
                              max_captures=cfg.max_captures_per_piece,
                              check_replays=cfg.check_replays or cfg.debug_graph_addresses, warned=self.warned,
                              strict=cfg.strict)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot be built: the graph runs uncaptured
            if cfg.strict:
                raise
            reason = f"{type(e).__name__}: {e}"
            warn_once(f"kunlun backend: the graph runtime of {name} could not be built; it runs without "
                      f"graphs: {reason}", self.warned)
            report.fallbacks.append(Fallback(name, "runtime", reason))
            report.pieces = 1
            return gm
        report.pieces = rt.piece_count
        report.runtime_info = rt.describe
        self.runtimes[name] = rt
        return rt


# ---- construction from options -------------------------------------------------------

_shared: Dict[CompileConfig, KunlunBackend] = {}
_shared_lock = threading.Lock()
_last_used: List[KunlunBackend] = []


def backend(config: Optional[CompileConfig] = None, **options: Any) -> KunlunBackend:
    """A new backend instance: `torch.compile(m, backend=kunlun_compile.backend(strict=True))`."""
    if config is not None and options:
        raise TypeError("give either a CompileConfig or options, not both")
    return KunlunBackend(config or CompileConfig.from_options(options))


def dynamo_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None,
                   mode: Optional[str] = None) -> Callable:
    """The function behind `backend="kunlun"` (registered by entry point).

    Models compiled with the same options share one backend instance, so their
    graphs land in one report (`kunlun_compile.last_report()`).
    """
    if mode not in (None, "default"):
        raise ValueError(f"kunlun backend: mode={mode!r} is not supported; pass options={{...}} instead "
                         f"(valid options: {list(CompileConfig.option_names())})")
    return shared_backend(CompileConfig.from_options(options))(gm, example_inputs)


def shared_backend(config: CompileConfig) -> KunlunBackend:
    """The one backend instance for `config` in this process (the most recently used one is
    what `last_report()` reads); the vLLM integration compiles through it too."""
    with _shared_lock:
        inst = _shared.get(config)
        if inst is None:
            inst = _shared[config] = KunlunBackend(config)
        _last_used[:] = [inst]
    return inst


class _RecompileLimitNotes(logging.Handler):
    """Dynamo's recompile limit makes it run a function eagerly and never call the backend for it again;
    it only logs a warning.  That warning becomes a note in the report of the backend used last."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            hit = parse_limit_warning(record.getMessage())
            if hit is not None and _last_used:
                _last_used[0].report.notes.append(describe_hit(hit))
        except Exception:  # noqa: BLE001 - never break a compile over reading a log line
            pass


logging.getLogger(DYNAMO_LOGGER).addHandler(_RecompileLimitNotes())


def last_report() -> CompileReport:
    """The report of the backend that `backend="kunlun"` used most recently."""
    return _last_used[0].report if _last_used else CompileReport()


def compile(model: Any, *, dynamic: Optional[bool] = None, fullgraph: bool = False, **options: Any):
    """`torch.compile(model, backend=kunlun_compile.backend(**options))`; the backend is `.kunlun_backend`.

    With dynamic=True one graph serves every token count from 1 up (see capture/dynamic.py).
    """
    be = backend(**options)
    _last_used[:] = [be]  # its recompile-limit notes land in its own report
    compiled = torch.compile(model, backend=be, dynamic=dynamic, fullgraph=fullgraph)
    if dynamic:
        compiled = with_serving_shapes(compiled, fall_back=not be.config.strict, warned=be.warned)
    # on the compiled wrapper itself: `OptimizedModule.__setattr__` forwards to the user's module, where a second
    # `compile` of the same module (other options) would overwrite it and both handles would read its report
    object.__setattr__(compiled, "kunlun_backend", be)
    return compiled
