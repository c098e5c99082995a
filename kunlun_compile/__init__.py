"""kunlun_compile: a torch.compile backend for LLM inference.

    torch.compile(model, backend="kunlun")                  # registered by entry point
    kunlun_compile.compile(model, strict=True)              # with options
    torch.compile(model, backend=kunlun_compile.backend(disable=["dead_code"]))

Layers
------
Lowest first.  A module imports only from its own package (or itself) and from lower layers;
names on one line, split by "|", are siblings that import neither each other.  Configuration
flows down as values (CompileConfig, function arguments), never up through imports or os.environ.
tests/test_layers.py reads this list and checks every import, at top level and inside functions.

    _version              the version string
    utils                 helpers every stage shares: graph copies, warnings, cache keys
    config                CompileConfig, and every KUNLUN_COMPILE_* variable (ENV_VARS, env_setting)
    report                GraphReport / CompileReport: what every stage did
    graph_stats           kernel counts of a graph
    triton_kernel         the Triton kernel wrapper: Kernel, use_triton, cpu_kernels, PDL, compiling_only
    lowering              element-wise clusters -> KIR -> Triton; the generated-kernel cache
    ops                   the kunlun:: fused ops (kunlun::pointwise runs lowering's kernels)
    capture               Dynamo graph -> ATen inference graph; recording graphs (record.py, graph_io.py)
    passes                the pass manager, the pattern engine and its rules
    runtime               the graph runtime: splitting, capture, replay, fallback
    backend               KunlunBackend: capture -> passes -> lowering -> runtime
    vllm | models         the vLLM integration | the built-in (demo) models
    debug                 what the CLI verbs run: replaying recorded graphs, bisect, align, bench, views
    cli                   argument parsing and printing
    __init__ | __main__   the package's public names | `python -m kunlun_compile`
"""
from . import ops  # noqa: F401 - registers torch.ops.kunlun.*
from ._version import __version__
from .backend import KunlunBackend, backend, compile, dynamo_backend, last_report
from .capture import serving_shapes
from .config import CompileConfig
from .report import CompileReport, GraphReport
from .utils import KunlunCompileWarning

__all__ = [
    "CompileConfig",
    "CompileReport",
    "GraphReport",
    "KunlunBackend",
    "KunlunCompileWarning",
    "backend",
    "compile",
    "dynamo_backend",
    "last_report",
    "serving_shapes",
    "__version__",
]
