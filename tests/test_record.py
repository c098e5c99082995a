"""Recording graphs (debug/record.py, debug/graph_io.py): exact round trips and faithful stand-ins."""
import json
import os

import torch

import kunlun_compile as kc
from kunlun_compile.debug.graph_io import graph_from_data, graph_to_data
from kunlun_compile.debug.inspect import InspectingBackend
from kunlun_compile.debug.record import ENV_DUMP, load_recorded
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
