"""The graph runtime: runs compiled graphs, falling back to the plain graph on failure."""
from .executor import GraphExecutor

__all__ = ["GraphExecutor"]
