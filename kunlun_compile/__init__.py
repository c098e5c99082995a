"""kunlun_compile: a torch.compile backend for LLM inference.

    torch.compile(model, backend="kunlun")                  # registered by entry point
    kunlun_compile.compile(model, strict=True)              # with options
    torch.compile(model, backend=kunlun_compile.backend(disable=["dead_code"]))
"""
from . import ops  # noqa: F401 - registers torch.ops.kunlun.*
from .backend import KunlunBackend, backend, compile, dynamo_backend, last_report
from .capture import serving_shapes
from .config import CompileConfig
from .report import CompileReport, GraphReport
from .utils import KunlunCompileWarning

__version__ = "0.1.0"

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
