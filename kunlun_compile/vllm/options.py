"""This backend's options as vLLM's config carries them.

vLLM's `CompilationConfig` has one free-form dict that reaches a compiler:
`inductor_compile_config` (mode 3 hands it to the compiler interface as
`compiler_config`).  Our options live under its "kunlun" key:

    compilation_config={"mode": 3, "backend": "kunlun",
                        "inductor_compile_config": {"kunlun": {"fast_math": True,
                                                               "disable": ["moe_ffn"],
                                                               "dump_dir": "/tmp/kunlun-dump"}}}

Any `CompileConfig` option is accepted; unknown names are an error listing the
valid ones.  Under vLLM the graph runtime defaults to "none": vLLM owns CUDA
graph capture (its cudagraph_mode), and two runtimes capturing the same graph
would fight over it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..config import CompileConfig

OPTIONS_KEY = "kunlun"


def options_from_vllm(compiler_config: Optional[Mapping[str, Any]]) -> dict:
    """Our options out of `inductor_compile_config` (or mode 3's `compiler_config`)."""
    raw = (compiler_config or {}).get(OPTIONS_KEY, {})
    if not isinstance(raw, Mapping):
        raise TypeError(f"kunlun backend: compilation_config.inductor_compile_config[{OPTIONS_KEY!r}] must be "
                        f"a dict of options, got {raw!r}")
    options = dict(raw)
    options.setdefault("graph_mode", "none")
    return options


def config_from_vllm(compiler_config: Optional[Mapping[str, Any]]) -> CompileConfig:
    return CompileConfig.from_options(options_from_vllm(compiler_config))
