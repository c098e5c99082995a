"""`KunlunCompilerInterface`: vLLM's compiler interface, backed by this backend (mode 3).

In mode 3 vLLM traces the model once, splits the graph at its splitting ops
(attention) and hands each piece here, once for the general token range and
once per compile size.  Each piece goes through the same path as
`torch.compile(backend="kunlun")`: AOTAutograd to ATen, the pass pipeline,
the element-wise lowering.  vLLM owns CUDA graphs, so our runtime stays out
(options.py).

Caching (warm starts): `compile` stores each piece's transformed graph in
vLLM's cache directory (warm_start.py, graph_store.py) and returns a handle
(our options' key, the graph's entry key); vLLM keeps the handle in its compile
cache and, on a later start, calls `load` with it and the piece.  `load` runs
AOTAutograd again and takes the transformed graph from the cache instead of
running the passes; a corrupt or mismatched entry is compiled again with one
warning naming why.  vLLM calls `load` outside its config context, so
everything it needs is kept from `compute_hash`, which vLLM calls first.

After every piece the worker's report is written next to vLLM's cache for its
rank, and into the dump directory when one is set (reports.py).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import torch.fx as fx
from vllm.compilation.compiler_interface import CompilerInterface

from ..backend import shared_backend
from ..capture.record import dump_dir, rank_dir
from ..lowering.cache import set_default_cache_dir
from ..utils import options_key, warn_once
from .graph_store import GraphStore
from .options import config_from_vllm, options_from_vllm
from .reports import write_report
from .warm_start import WarmStartStats, install, warm_start

GRAPHS_SUBDIR = os.path.join("kunlun_cache", "graphs")


def cache_key(compiler_config: Optional[dict]) -> str:
    """What a compiled piece depends on besides its graph: our version, our code, our options."""
    return options_key(options_from_vllm(compiler_config))[:16]


class KunlunCompilerInterface(CompilerInterface):
    name = "kunlun"

    def __init__(self) -> None:
        self.cache_dir: Optional[str] = None
        self.rank_dir: Optional[str] = None  # vLLM's per-rank cache folder (cache_dir less the prefix)
        self.disable_cache = False
        self.store: Optional[GraphStore] = None
        self.compiler_config: Optional[dict] = None
        self.info: dict = {}  # what the worker report says about this engine
        self.rank = 0
        self.stats = WarmStartStats()

    def compute_hash(self, vllm_config: Any) -> str:
        # load() is called outside vLLM's config context (get_current_vllm_config() asserts there):
        # what it needs is kept here
        self.compiler_config = vllm_config.compilation_config.inductor_compile_config
        self.rank = int(getattr(vllm_config.parallel_config, "rank", 0) or 0)
        model = getattr(vllm_config, "model_config", None)
        self.info = {"model": str(getattr(model, "model", "")), "mode": 3,
                     "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size}
        return cache_key(self.compiler_config)

    def initialize_cache(self, cache_dir: str, disable_cache: bool = False, prefix: str = "") -> None:
        self.cache_dir = cache_dir
        self.disable_cache = disable_cache
        base = cache_dir[: -len(prefix)] if prefix and cache_dir.endswith(prefix) else cache_dir
        self.rank_dir = base.rstrip(os.sep)
        self.store = None if disable_cache else GraphStore(os.path.join(self.rank_dir, GRAPHS_SUBDIR))
        if not disable_cache:
            # generated kernels next to vLLM's own artifacts for this model and config (unless
            # KUNLUN_COMPILE_CACHE_DIR names a directory: that one wins)
            set_default_cache_dir(os.path.join(base, "kunlun_cache"))

    def compile(self, graph: fx.GraphModule, example_inputs: list, compiler_config: dict,
                compile_range: Any, key: Optional[str] = None) -> Tuple[Optional[Callable], Any]:
        compiled, entry = self._compile(graph, example_inputs, compiler_config, expected=None)
        if self.disable_cache:
            return compiled, None
        # vLLM's cache file holds the handle as a literal pair of strings
        return compiled, (cache_key(compiler_config), entry or "")

    def load(self, handle: Any, graph: fx.GraphModule, example_inputs: list, graph_index: int,
             compile_range: Any) -> Callable:
        config = self.compiler_config if self.compiler_config is not None else {}
        expected = None
        if not (isinstance(handle, (tuple, list)) and len(handle) == 2 and all(isinstance(h, str) for h in handle)):
            reason = f"not a kunlun compile-cache handle: {handle!r}"
        elif handle[0] != cache_key(config):
            reason = "the entry was made by another kunlun_compile version or other options"
        else:
            reason, expected = None, handle[1] or None
        if reason:
            warn_once(f"kunlun backend: piece {graph_index} is compiled again ({reason})",
                      shared_backend(config_from_vllm(config)).warned)
        compiled, _ = self._compile(graph, example_inputs, config, expected=expected)
        return compiled

    def _compile(self, graph: fx.GraphModule, example_inputs: list, compiler_config: Optional[dict],
                 expected: Optional[str]) -> Tuple[Callable, Optional[str]]:
        backend = shared_backend(config_from_vllm(compiler_config))
        install(backend)
        with warm_start(self.store, expected, self.stats, backend.warned) as session:
            compiled = backend(graph, example_inputs)
        self._write_report(backend)
        return compiled, session.key if session is not None else None

    def _write_report(self, backend) -> None:
        folders = [self.rank_dir] if self.rank_dir else []
        directory = backend.config.dump_dir or dump_dir()
        if directory:
            folders.append(rank_dir(directory))
        try:
            write_report(folders, rank=self.rank, report=backend.report, warm_start=self.stats.as_dict(), **self.info)
        except Exception as e:  # noqa: BLE001 - a report is a debugging aid; never fail the compile over it
            warn_once(f"kunlun backend: could not write the worker report: {type(e).__name__}: {e}", backend.warned)
