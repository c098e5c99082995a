"""Element-wise lowering to vector and SFU instructions (KIR) and Triton code generation.

Not built yet: remaining element-wise ATen ops run as ATen calls, and the
report counts them under kernels.aten (kernels.pointwise stays 0).
"""
