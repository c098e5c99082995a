"""Random element-wise programs for the lowering's property tests.

A program is a list of steps over a growing list of values (the inputs
first); each step applies one element-wise op to earlier values.  Ops with a
restricted domain get their argument made safe by other lowered ops
(`abs(x) + 0.25`, `clamp(x, -8, 8)`), so programs stay finite and every step
is still something the lowering has to handle.  `run(program, inputs)` is
plain torch: the same function is eager, the float64 reference, and what
make_fx traces.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

F = torch.nn.functional


def _pos(x):
    return x.abs() + 0.25


def _clamped(x):
    return x.clamp(-8.0, 8.0)


UNARY = {
    "neg": torch.neg, "abs": torch.abs,
    "exp": lambda x: torch.exp(_clamped(x)), "exp2": lambda x: torch.exp2(_clamped(x)),
    "expm1": lambda x: torch.expm1(_clamped(x)),
    "log": lambda x: torch.log(_pos(x)), "log2": lambda x: torch.log2(_pos(x)),
    "log1p": lambda x: torch.log1p(x.abs()), "sqrt": lambda x: torch.sqrt(_pos(x)),
    "rsqrt": lambda x: torch.rsqrt(_pos(x)), "reciprocal": lambda x: torch.reciprocal(_pos(x)),
    "pow2": lambda x: torch.pow(x, 2), "pow3": lambda x: torch.pow(x, 3), "pow_half": lambda x: torch.pow(_pos(x), 0.5),
    "pow_m1": lambda x: torch.pow(_pos(x), -1), "pow_1_7": lambda x: torch.pow(_pos(x), 1.7),
    "sin": torch.sin, "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": torch.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2), "erf": torch.erf,
    "clamp": lambda x: torch.clamp(x, -0.5, 1.5), "clamp_min": lambda x: torch.clamp_min(x, 0.1),
    "add_scalar": lambda x: x + 1.5, "mul_scalar": lambda x: x * -0.75, "rsub_scalar": lambda x: 2.0 - x,
    "full_like_add": lambda x: x + torch.full_like(x, 0.5),
}
BINARY = {
    "add": torch.add, "add_alpha": lambda a, b: torch.add(a, b, alpha=0.5), "sub": torch.sub, "mul": torch.mul,
    "div": lambda a, b: a / _pos(b), "minimum": torch.minimum, "maximum": torch.maximum,
}
COMPARE = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
           "gt_scalar": lambda a, b: a > 0.3}
LOGICAL = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor,
           "bit_and": torch.bitwise_and, "bit_or": torch.bitwise_or}
UNARY_LOGICAL = {"not": torch.logical_not, "bit_not": torch.bitwise_not}
# Indexing that keeps the shape: a rotation by cat of two slices (rotate_half's form), a reversal by a
# gather of arange ids, a transpose-and-back through a computed value, pads, repeats, triangles.
INDEX = {
    "roll": lambda x, d: torch.cat((x.narrow(d, 1, x.shape[d] - 1), x.narrow(d, 0, 1)), d)
    if x.shape[d] > 1 else x * 1.0,
    "reverse": lambda x, d: x.index_select(d, torch.arange(x.shape[d] - 1, -1, -1, device=x.device)),
    "transpose_back": lambda x, d: (x.transpose(0, d) * 1.0).transpose(0, d),
    # a shift by one with a zero fill (pad one before, crop one after), the first half repeated, a triangle
    "shift": lambda x, d: torch.nn.functional.pad(x.transpose(d, -1), (1, -1)).transpose(d, -1),
    "repeat_half": lambda x, d: x.narrow(d, 0, x.shape[d] // 2).repeat(
        *[2 if k == d % x.dim() else 1 for k in range(x.dim())]) if x.shape[d] % 2 == 0 else x * 1.0,
    "tril": lambda x, d: torch.tril(x, diagonal=d) if x.dim() >= 2 else x * 1.0,
    # every value sorted (ranks: lowering/small_sorts.py), ascending or descending by the dim's parity; sorted
    # values move at most as far as their inputs do, so the tolerance of the value before carries over
    "sort_flat": lambda x, d: torch.sort(x.reshape(-1), descending=d % 2 == 1, stable=True).values.reshape(
        x.shape) if x.dim() else x * 1.0,
}
# Reductions along one dim, kept as size 1 (so the result broadcasts back against its row), and row ops
# with a value per element (softmax, cumsum).
REDUCE = {
    "sum": lambda x, d: x.sum(d, keepdim=True), "mean": lambda x, d: x.mean(d, keepdim=True),
    "amax": lambda x, d: x.amax(d, keepdim=True), "amin": lambda x, d: x.amin(d, keepdim=True),
    "var": lambda x, d: x.var(d, keepdim=True), "softmax": lambda x, d: torch.softmax(x, d),
    "log_softmax": lambda x, d: torch.log_softmax(_clamped(x), d),
    "softmax_fp32": lambda x, d: torch.softmax(x.float(), d).to(x.dtype),
    "cumsum": lambda x, d: torch.cumsum(x, d),  # a scan: one value per element
}


def run(program, inputs):
    vals = list(inputs)
    for kind, name, args in program:
        a = [vals[i] for i in args]
        if kind == "unary":
            v = UNARY[name](a[0])
        elif kind == "binary":
            v = BINARY[name](a[0], a[1])
        elif kind == "compare":
            v = COMPARE[name](a[0], a[1])
        elif kind == "logical":
            v = LOGICAL[name](a[0], a[1])
        elif kind == "not":
            v = UNARY_LOGICAL[name](a[0])
        elif kind == "where":
            v = torch.where(a[0], a[1], a[2])
        elif kind == "masked_fill":
            v = a[1].masked_fill(a[0], -1.25)
        elif kind == "cast":
            v = a[0].to(getattr(torch, name)).to(a[0].dtype)
        elif kind == "reduce":
            op, dim = name
            v = REDUCE[op](a[0], dim % max(a[0].dim(), 1))
        elif kind == "index":
            op, dim = name
            v = INDEX[op](a[0], dim % a[0].dim()) if a[0].dim() else a[0] * 1.0
        else:
            raise ValueError(kind)
        vals.append(v)
    return vals[len(inputs):]


@st.composite
def programs(draw, max_steps=6, reductions=False, indexing=False):
    """(program, input shapes, float dtype); with `reductions`, some steps reduce a value along one dim; with
    `indexing`, some move values (cat of slices, gathers, transposes of computed values)."""
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(2, 5), min_size=rank, max_size=rank)))
    n_in = draw(st.integers(1, 3))
    shapes = [shape]
    for _ in range(n_in - 1):
        keep = draw(st.integers(0, rank))  # drop leading dims
        dims = [s if draw(st.booleans()) else 1 for s in shape[rank - keep:]]
        shapes.append(tuple(dims))
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    floats = list(range(n_in))
    bools: list = []
    program = []
    for _ in range(draw(st.integers(1, max_steps))):
        n = n_in + len(program)
        choices = (["unary", "unary", "binary", "binary", "compare"] + ["reduce", "reduce"] * reductions
                   + ["index", "index"] * indexing)
        if bools:
            choices += ["where", "masked_fill", "logical", "not"]
        kind = draw(st.sampled_from(choices))
        def pick(pool):
            return draw(st.sampled_from(pool))
        if kind == "unary":
            program.append(("unary", draw(st.sampled_from(sorted(UNARY))), (pick(floats),)))
            floats.append(n)
        elif kind == "binary":
            program.append(("binary", draw(st.sampled_from(sorted(BINARY))), (pick(floats), pick(floats))))
            floats.append(n)
        elif kind == "compare":
            program.append(("compare", draw(st.sampled_from(sorted(COMPARE))), (pick(floats), pick(floats))))
            bools.append(n)
        elif kind == "logical":
            program.append(("logical", draw(st.sampled_from(sorted(LOGICAL))), (pick(bools), pick(bools))))
            bools.append(n)
        elif kind == "not":
            program.append(("not", draw(st.sampled_from(sorted(UNARY_LOGICAL))), (pick(bools),)))
            bools.append(n)
        elif kind == "reduce":
            op = draw(st.sampled_from(sorted(REDUCE)))
            program.append(("reduce", (op, draw(st.integers(-rank, rank - 1))), (pick(floats),)))
            floats.append(n)
        elif kind == "index":
            op = draw(st.sampled_from(sorted(INDEX)))
            program.append(("index", (op, draw(st.integers(-rank, rank - 1))), (pick(floats),)))
            floats.append(n)
        elif kind == "where":
            program.append(("where", "", (pick(bools), pick(floats), pick(floats))))
            floats.append(n)
        else:
            program.append(("masked_fill", "", (pick(bools), pick(floats))))
            floats.append(n)
    if draw(st.booleans()):
        other = "float32" if dtype != "float32" else "bfloat16"
        program.append(("cast", other, (pick(floats),)))
    return program, shapes, dtype
