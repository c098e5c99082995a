"""The graph runtime: pieces captured per size and replayed (CUDA graphs), with a fallback to the
plain graph on failure."""
from .executor import GraphExecutor
from .piecewise import GraphRuntime

__all__ = ["GraphExecutor", "GraphRuntime"]
