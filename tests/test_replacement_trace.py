"""The replacement recorder (`passes/replacement_trace.py`) gives make_fx's graph, or refuses.

Every replacement a compile inserts is recorded by one dispatch mode instead of make_fx (a third of the
time).  The two must give the same graph: the same ops in the same order, the same arguments, the same
values (shape, stride, dtype) on every node.  Where the recorder cannot be faithful it raises and the
engine traces with make_fx."""
import collections
import contextlib

import pytest
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode

import kunlun_compile as kc
from kunlun_compile.models import build_model
from kunlun_compile.passes import pattern_engine as pe
from kunlun_compile.passes import replacement_trace as rt
from kunlun_compile.passes.canonical import canonicalize


def _signature(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def args(a):
        return str(fx.node.map_arg(a, lambda x: f"%{index[x]}"))

    out = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        meta = (tuple(v.shape), tuple(v.stride()), v.dtype) if isinstance(v, torch.Tensor) else None
        # torch 2.11's matcher asserts `tensor_meta` on every tensor-valued replacement node
        tensor_meta = n.meta.get("tensor_meta")
        tensor_meta = (tuple(tensor_meta.shape), tensor_meta.dtype) if tensor_meta is not None else None
        out.append((n.op, str(n.target), args(n.args), args(n.kwargs), meta, tensor_meta))
    return out


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "deepseek-v3-tiny", "qwen3-next-tiny"])
def test_every_replacement_of_a_compile_records_as_make_fx_traces(name, monkeypatch):
    """Each replacement the compile traces is also recorded; both graphs must agree node for node."""
    seen = collections.Counter()

    def both(fn, vals):
        want = pe.trace_aten(fn, vals)
        try:
            got = rt.record(fn, vals)
        except rt.Unrecordable as e:
            seen[f"refused: {e}"] += 1
            return want
        canonicalize(got)
        assert _signature(got) == _signature(want), f"recorded:\n{got.graph}\ntraced:\n{want.graph}"
        seen["same"] += 1
        return want

    monkeypatch.setattr(pe, "_record_or_trace", both)
    monkeypatch.setattr(pe, "_replacements", collections.OrderedDict())  # every replacement traced here
    model, inputs = build_model(name, dtype=torch.float32, device="cpu", num_tokens=8, seed=0)
    torch._dynamo.reset()
    with torch.no_grad():
        kc.compile(model, graph_mode="none")(*inputs)
    assert seen["same"] >= 5, seen  # the prologue, the norms, the router, the experts at least


def _fake(*shapes):
    mode = FakeTensorMode()
    with mode:
        return [torch.empty(s) for s in shapes]


def test_a_tuple_result_becomes_getitem_nodes_with_their_values():
    (x,) = _fake((4, 8))
    gm = rt.record(lambda t: torch.topk(t, 2, dim=-1), [x])
    items = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"]
    assert [tuple(n.meta["val"].shape) for n in items] == [(4, 2), (4, 2)]
    assert [n.meta["val"].dtype for n in items] == [torch.float32, torch.int64]


def test_the_backends_decompositions_are_applied():
    x, a, b = _fake((4, 8), (4, 8), (8,))
    gm = rt.record(lambda t, u, v: torch.addcmul(t, u, v, value=0.5), [x, a, b])
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "aten.addcmul.default" not in ops and "aten.mul.Tensor" in ops and "aten.add.Tensor" in ops


def test_a_mutation_is_refused():
    (x,) = _fake((4, 8))
    with pytest.raises(rt.Unrecordable, match="mutates"):
        rt.record(lambda t: (t * 2).add_(1), [x])


def test_a_tensor_made_outside_the_dispatcher_is_refused():
    (x,) = _fake((4, 8))
    constant = torch.ones(8)
    with pytest.raises(rt.Unrecordable, match="constant"):
        rt.record(lambda t: t * constant, [x])


def test_symbolic_sizes_are_refused():
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.randn(4, 8), symbolic_context=None)
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(4, 8), source=ConstantSource("x"), symbolic_context=ctx)
    with pytest.raises(rt.Unrecordable, match="static"):
        rt.record(lambda t: t * 2, [x])


def test_the_engine_falls_back_to_make_fx_where_the_recorder_refuses():
    (x,) = _fake((4, 8))
    gm = pe._record_or_trace(lambda t: (t * 2).add_(1), [x])
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert ops == ["aten.mul.Tensor", "aten.add.Tensor"]  # functionalized by make_fx


AMBIENTS = {
    "plain": contextlib.nullcontext,
    "inference_mode": torch.inference_mode,
    # inside vLLM's compile: composite ops (`x.to(dtype)`) reach a dispatch mode whole
    "below_autograd": torch._C._AutoDispatchBelowAutograd,
    # inside inductor: prim ops (`prim::device`) reach it too
    "python_dispatcher": enable_python_dispatcher,
}


@pytest.mark.parametrize("ambient", list(AMBIENTS))
def test_every_rules_pattern_records_as_make_fx_traces(ambient):
    """The search functions of every rule, in every dtype it is traced for: recorded where the recorder
    takes them, the same graph as make_fx's in the same dispatch state (the pattern cache stores whichever
    ran, and a compile runs them in its own state)."""
    from kunlun_compile.passes import fusion

    seen = collections.Counter()
    for rules in fusion.FAMILY_RULES.values():
        for rule in rules:
            for dtype in rule.dtypes or (torch.float32,):
                tensors, markers = list(rule.example_inputs(dtype)), dict(rule.constants)

                def fn(*ts, rule=rule, markers=markers):
                    return rule.search(*ts, **markers)

                mode = FakeTensorMode()
                with AMBIENTS[ambient]():
                    want = pe.trace_aten(fn, tensors)
                    try:
                        got = rt.record(fn, [mode.from_tensor(t) for t in tensors])
                    except rt.Unrecordable:
                        seen["refused"] += 1
                        continue
                canonicalize(got)
                assert _signature(got) == _signature(want), f"{rule.family}/{rule.name} {dtype}"
                seen["same"] += 1
    assert seen["same"] > 200, seen  # most rules are functional; the scatter/index_put ones are refused
