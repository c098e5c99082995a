"""Capture: Dynamo FX graph -> functionalized ATen inference graph."""
from .aot import needs_autograd, static_input_indices, to_aten_inference
from .decompositions import DECOMPOSED_OPS, decomposition_table
from .dynamic import serving_shapes, with_serving_shapes

__all__ = ["DECOMPOSED_OPS", "decomposition_table", "needs_autograd", "serving_shapes", "static_input_indices",
           "to_aten_inference", "with_serving_shapes"]
