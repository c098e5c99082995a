import importlib
import warnings

import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.config import CompileConfig
from kunlun_compile.passes import GraphPass, PassFailure, PassOutcome, default_passes
from kunlun_compile.utils import KunlunCompileWarning

aten = torch.ops.aten


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.w = torch.nn.Parameter(torch.randn(16))

    def forward(self, x, r):
        h = x + r
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return self.lin(y).view(y.shape), h


def _inputs(n=5):
    return torch.randn(n, 16), torch.randn(n, 16)


def _sabotage(gm, ctx):
    """Half-edit the graph (add -> sub), then fail: the manager must undo the edit."""
    for node in gm.graph.nodes:
        if node.target is aten.add.Tensor:
            node.target = aten.sub.Tensor
    raise RuntimeError("planted failure")


def _backend_with(extra_pass, strict):
    return kc.KunlunBackend(CompileConfig(strict=strict), passes=default_passes() + [extra_pass])


def _kunlun_warnings(record):
    return [w for w in record if issubclass(w.category, KunlunCompileWarning)]


def _run_correct_three_times(extra_pass):
    """Compile Block with `extra_pass` (non-strict), check 3 calls against eager; return (backend, warnings)."""
    m = Block().eval().requires_grad_(False)
    be = _backend_with(extra_pass, strict=False)
    compiled = torch.compile(m, backend=be)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            x, r = _inputs()
            torch.testing.assert_close(compiled(x, r), m(x, r), rtol=1e-6, atol=1e-6)
    return be, _kunlun_warnings(rec)


def test_failing_pass_warns_once_and_result_is_correct():
    be, ws = _run_correct_three_times(GraphPass("sabotage", "fails halfway", _sabotage))
    assert len(ws) == 1, [str(w.message) for w in ws]
    msg = str(ws[0].message)
    assert "sabotage" in msg and "graph_0" in msg and "planted failure" in msg
    fb = be.report.summary()["fallbacks"]
    assert fb == [{"graph": "graph_0", "pass": "sabotage", "reason": "RuntimeError: planted failure"}]
    assert be.report.graphs[0].passes[-1].skipped.startswith("failed")


def test_failing_pass_raises_under_strict():
    m = Block().eval().requires_grad_(False)
    be = _backend_with(GraphPass("sabotage", "fails halfway", _sabotage), strict=True)
    with pytest.raises(Exception) as e:
        torch.compile(m, backend=be)(*_inputs())
    assert "planted failure" in str(e.value)
    assert isinstance(e.value, PassFailure) or "PassFailure" in repr(e.value) or "sabotage" in str(e.value)


def _explodes_at_run_time(*args, **kwargs):
    raise RuntimeError("kernel launch failed (planted)")


def _break_at_run_time(gm, ctx):
    n = 0
    for node in gm.graph.nodes:
        # the Linear (the norm is fused by now; at 5 rows x 16 outputs the Linear is a kunlun::linear GEMV)
        if node.target in (aten.addmm.default, aten.mm.default, torch.ops.kunlun.linear.default):
            node.target = _explodes_at_run_time
            n += 1
    return PassOutcome(matches=n)


def test_run_time_failure_falls_back_to_the_uncompiled_graph():
    be, ws = _run_correct_three_times(GraphPass("bad_kernel", "breaks at run time", _break_at_run_time))
    assert len(ws) == 1 and "failed at run time" in str(ws[0].message)
    assert be.report.summary()["fallbacks"][0]["pass"] == "runtime"


def test_run_time_failure_raises_under_strict():
    m = Block().eval().requires_grad_(False)
    be = _backend_with(GraphPass("bad_kernel", "breaks at run time", _break_at_run_time), strict=True)
    with pytest.raises(RuntimeError, match="planted"):
        torch.compile(m, backend=be)(*_inputs())


def test_pass_records_numbers():
    m = Block().eval().requires_grad_(False)
    be = kc.backend(strict=True)
    torch.compile(m, backend=be)(*_inputs())
    (g,) = be.report.graphs
    names = [p.name for p in g.passes]
    assert names == [p.name for p in default_passes()]
    noop = g.passes[0]
    assert noop.name == "remove_noop_ops" and noop.matches >= 1  # the .view(y.shape)
    assert noop.nodes_after == noop.nodes_before - noop.matches
    assert all(p.time_ms >= 0 for p in g.passes)
    # the add + RMSNorm became one fused kernel, the Linear (5 rows, 16 outputs) a GEMV
    assert g.patterns["add_rmsnorm"] == 1 and g.patterns["decode_linear"] == 1 and g.kernels["fused"] == 2
    assert g.kernels["aten"] < g.kernels_before["aten"]
    assert g.pieces == 1
    d = g.as_dict()
    assert set(d["patterns"]) == {"norm_rope_gate", "add_rmsnorm", "moe_gate", "moe_ffn", "masked_input",
                                  "attention_mask", "decode_linear"}


def test_duplicate_pass_names_rejected():
    p = default_passes()[0]
    with pytest.raises(ValueError, match="duplicate"):
        kc.KunlunBackend(CompileConfig(), passes=[p, p])


def _capture_breaks(*args, **kwargs):
    raise RuntimeError("capture broke (planted)")


def test_capture_failure_runs_the_graph_eagerly(monkeypatch):
    backend_module = importlib.import_module("kunlun_compile.backend")

    monkeypatch.setattr(backend_module, "to_aten_inference", _capture_breaks)
    m = Block().eval().requires_grad_(False)
    be = kc.backend(strict=False)
    compiled = torch.compile(m, backend=be)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        x, r = _inputs()
        torch.testing.assert_close(compiled(x, r), m(x, r), rtol=0, atol=0)
    ws = _kunlun_warnings(rec)
    assert len(ws) == 1 and "capture of graph_0 failed" in str(ws[0].message)
    assert be.report.graphs[0].mode == "eager-fallback"
    assert be.report.summary()["fallbacks"][0]["pass"] == "capture"

    strict = kc.backend(strict=True)
    with pytest.raises(Exception, match="planted"):
        torch.compile(m, backend=strict)(*_inputs())
