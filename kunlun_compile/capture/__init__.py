"""Capture: Dynamo FX graph -> functionalized ATen inference graph."""
from .aot import needs_autograd, to_aten_inference
from .decompositions import DECOMPOSED_OPS, decomposition_table

__all__ = ["DECOMPOSED_OPS", "decomposition_table", "needs_autograd", "to_aten_inference"]
