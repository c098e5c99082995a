"""Recording graphs (capture/record.py, capture/graph_io.py) and replaying them (debug/record.py): exact round
trips and faithful stand-ins."""
import json
import os
import warnings

import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.capture.graph_io import graph_from_data, graph_to_data
from kunlun_compile.capture.record import ENV_DUMP
from kunlun_compile.debug.inspect import InspectingBackend
from kunlun_compile.debug.record import load_recorded
from kunlun_compile.models import build_model


class Constants(torch.nn.Module):
    def forward(self, x):
        n = x.shape[0]
        mask = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        table = torch.tensor([1.0, 2.0, 3.0])  # a tensor constant: a get_attr in the ATen graph
        return (x @ x.T + mask).softmax(-1).sum(-1, keepdim=True) * table[1] + n


def _received_graphs(module, *inputs, dynamic):
    backend = InspectingBackend()
    with torch.inference_mode():
        torch.compile(module, backend=backend, dynamic=dynamic)(*inputs)
    return backend.kept


def test_graph_round_trips_node_for_node():
    for dynamic in (False, True):
        torch._dynamo.reset()
        (kept,) = _received_graphs(Constants(), torch.randn(5, 4), dynamic=dynamic)
        gm = kept.before
        data, tensors = graph_to_data(gm)
        back = graph_from_data(json.loads(json.dumps(data)), tensors)
        assert back.code == gm.code  # zeros with constant sizes, -inf, sym sizes, constants: all as they were
        args = [a for a in kept.args]
        torch.testing.assert_close(back(*args), gm(*args), rtol=0, atol=0)


def test_recorded_stand_ins_keep_ranges_strides_and_symbolic_dims(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DUMP, str(tmp_path))
    model, inputs = build_model("llama-tiny", num_tokens=8)
    compiled = kc.compile(model, dynamic=True)
    with torch.inference_mode():
        compiled(*inputs)
    (report,) = compiled.kunlun_backend.report.graphs
    assert report.recorded_at == os.path.join(str(tmp_path), "graph_0")
    module, stand_ins = load_recorded(report.recorded_at)
    specs = [s for s in json.load(open(os.path.join(report.recorded_at, "inputs.json")))["inputs"]
             if s["kind"] == "tensor"]
    assert len(stand_ins) == len(specs)
    for x, spec in zip(stand_ins, specs):
        assert list(x.shape) == spec["shape"] and list(x.stride()) == spec["stride"]
        assert str(x.dtype) == "torch." + spec["dtype"]
        if "min" in spec["stats"]:
            assert spec["stats"]["min"] <= int(x.min()) and int(x.max()) <= spec["stats"]["max"]
    ids = next(s for s in specs if s["dtype"] == "int64")
    assert ids["symbolic_dims"] == [0]  # the token count stays symbolic when replayed
    with torch.inference_mode():
        out = module(*stand_ins)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


class ResidualNorm(torch.nn.Module):
    """A residual add + RMSNorm (the add_rmsnorm pass matches it)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64), requires_grad=False)

    def forward(self, x, residual):
        h = x + residual
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * self.weight, h


def _compile_with_fake_inputs(monkeypatch, dump):
    """Compile as vLLM does: the backend gets Dynamo's graph with fake example inputs (the
    placeholders' example values), so the recorder sees fake tensors of the compile's shape env."""
    if dump:
        monkeypatch.setenv(ENV_DUMP, str(dump))
    else:
        monkeypatch.delenv(ENV_DUMP, raising=False)
    torch._dynamo.reset()
    backend = kc.backend()
    shape_envs = []

    def vllm_like(gm, example_inputs):
        fakes = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
        first = fakes[0]
        shape_envs.append(first.node.shape_env if isinstance(first, torch.SymInt) else first.fake_mode.shape_env)
        backend(gm, fakes)
        return gm.forward

    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(ResidualNorm(), backend=vllm_like, dynamic=True)(torch.randn(8, 64), torch.randn(8, 64))
    (shape_env,) = shape_envs
    unbacked = [s for s in shape_env.var_to_range if str(s).startswith("u")]
    return backend.report, [str(w.message) for w in caught if "kunlun" in str(w.message)], unbacked


def test_recording_fake_inputs_changes_nothing(tmp_path, monkeypatch):
    plain, plain_warnings, _ = _compile_with_fake_inputs(monkeypatch, None)
    recorded, warnings_, unbacked = _compile_with_fake_inputs(monkeypatch, tmp_path)
    assert plain_warnings == [] and warnings_ == []  # before the fix: "could not record graph_0 ... u0"
    assert unbacked == []  # no data-dependent symbol added to the compile's shape env
    assert recorded.summary()["patterns"] == plain.summary()["patterns"]
    assert recorded.summary()["patterns"]["add_rmsnorm"] == 1
    (graph,) = recorded.graphs
    assert sorted(os.listdir(graph.recorded_at)) == ["graph.json", "graph.py", "inputs.json"]
    tensors = [s for s in json.load(open(os.path.join(graph.recorded_at, "inputs.json")))["inputs"]
               if s["kind"] == "tensor"]
    assert [s["stats"] for s in tensors] == [{}, {}, {}]  # fake inputs (the weight too, here) have no data
    module, stand_ins = load_recorded(graph.recorded_at)
    with torch.inference_mode():
        module(*stand_ins)


def test_recording_data_dependent_sizes_and_no_half_written_graphs(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from kunlun_compile.capture.record import describe_input, record_graph

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        nz = torch.ops.aten.nonzero.default(mode.from_tensor(torch.ones(4)))  # rows: a data-dependent u0
    spec = describe_input(nz, None, False)
    assert spec["shape"] == [None, 1] and spec["data_dependent_dims"] == [0] and spec["stats"] == {}

    class Unrecordable(torch.nn.Module):  # a node whose target cannot be recorded
        def forward(self, x):
            return x + 1

    gm = torch.fx.symbolic_trace(Unrecordable())
    next(n for n in gm.graph.nodes if n.op == "call_function").target = lambda a, b: a + b
    gm.recompile()
    with pytest.raises(ValueError):
        record_graph(str(tmp_path), gm, [torch.randn(2)], None, [])
    assert os.listdir(tmp_path) == []  # nothing left behind, not even an empty graph_0
