"""`KunlunCompilerInterface`: vLLM's compiler interface, backed by this backend (mode 3).

In mode 3 vLLM traces the model once, splits the graph at its splitting ops
(attention) and hands each piece here, once for the general token range and
once per compile size.  Each piece goes through the same path as
`torch.compile(backend="kunlun")`: AOTAutograd to ATen, the pass pipeline,
the element-wise lowering.  vLLM owns CUDA graphs, so our runtime stays out
(options.py).

Caching: `compile` returns a handle (the cache key and the piece's place);
vLLM stores it in its compile cache and, on a warm start, calls `load` with
the handle and the piece's graph.  `load` checks the handle was made by this
code with these options and compiles the graph again; what survives the
process is our disk cache of generated kernels, which `initialize_cache`
points into vLLM's cache directory.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import torch.fx as fx
from vllm.compilation.compiler_interface import CompilerInterface

from ..backend import shared_backend
from ..lowering.cache import ENV_CACHE_DIR
from ..utils import options_key
from .options import config_from_vllm, options_from_vllm


def cache_key(compiler_config: Optional[dict]) -> str:
    """What a compiled piece depends on besides its graph: our version, our code, our options."""
    return options_key(options_from_vllm(compiler_config))[:16]


class KunlunCompilerInterface(CompilerInterface):
    name = "kunlun"

    def __init__(self) -> None:
        self.cache_dir: Optional[str] = None
        self.disable_cache = False

    def compute_hash(self, vllm_config: Any) -> str:
        return cache_key(vllm_config.compilation_config.inductor_compile_config)

    def initialize_cache(self, cache_dir: str, disable_cache: bool = False, prefix: str = "") -> None:
        self.cache_dir = cache_dir
        self.disable_cache = disable_cache
        base = cache_dir[: -len(prefix)] if prefix and cache_dir.endswith(prefix) else cache_dir
        if not disable_cache and not os.environ.get(ENV_CACHE_DIR):
            # generated kernels next to vLLM's own artifacts for this model and config
            os.environ[ENV_CACHE_DIR] = os.path.join(base, "kunlun_cache")

    def compile(self, graph: fx.GraphModule, example_inputs: list, compiler_config: dict,
                compile_range: Any, key: Optional[str] = None) -> Tuple[Optional[Callable], Any]:
        compiled = shared_backend(config_from_vllm(compiler_config))(graph, example_inputs)
        if self.disable_cache:
            return compiled, None
        return compiled, (cache_key(compiler_config), key or "")

    def load(self, handle: Any, graph: fx.GraphModule, example_inputs: list, graph_index: int,
             compile_range: Any) -> Callable:
        if not (isinstance(handle, (tuple, list)) and len(handle) == 2 and isinstance(handle[0], str)):
            raise ValueError(f"kunlun backend: not a kunlun compile-cache handle: {handle!r}")
        from vllm.config import get_current_vllm_config

        compiler_config = get_current_vllm_config().compilation_config.inductor_compile_config
        if handle[0] != cache_key(compiler_config):
            raise ValueError("kunlun backend: the compile-cache entry was made by another kunlun_compile version or "
                             "other options; clear vLLM's compile cache (VLLM_DISABLE_COMPILE_CACHE=1 skips it)")
        return shared_backend(config_from_vllm(compiler_config))(graph, example_inputs)
