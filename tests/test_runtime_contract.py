"""The graph runtime's memory contract (runtime/__init__.py), on the CPU: capture sets, the memory plan,
padding proofs, per-call fallbacks and the replay checker.  The CPU runs the same runtime code with plain
calls in place of CUDA graph replays; everything but the capture itself is exercised."""
import operator
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import kunlun_compile as kc
from kunlun_compile.runtime.capture import CapturedPiece, static_buffer_like
from kunlun_compile.runtime.checking import ReplayCheckError
from kunlun_compile.runtime.memory_plan import copy_outputs, plan_memory
from kunlun_compile.runtime.splitting import SplitReason, input_view_nodes, split_graph

MODES = ["piecewise", "full", "full_and_piecewise"]


def rel(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _BrokenLayer(nn.Module):
    """A graph break inside the layer: Dynamo compiles the part after it once and calls that graph with
    every layer's weights as inputs."""

    def __init__(self, h):
        super().__init__()
        self.up = nn.Linear(h, 4 * h, bias=False)
        self.down = nn.Linear(4 * h, h, bias=False)
        self.norm = nn.RMSNorm(h)

    def forward(self, x):
        y = self.up(self.norm(x))
        torch._dynamo.graph_break()
        return x + self.down(F.silu(y))


class _Stack(nn.Module):
    def __init__(self, h=32, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(_BrokenLayer(h) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("mode", MODES)
def test_a_graph_shared_by_layers_replays_each_layers_weights(mode):
    """The cause of the silently wrong decode stack: captures keyed by size only replayed the first
    layer's weights for every layer (rel. error 0.25-0.47 here before the fix)."""
    torch.manual_seed(0)
    model = _Stack().eval()
    torch._dynamo.reset()
    be = kc.backend(graph_mode=mode)
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for _ in range(4):  # warm-up, capture, replays
            x = torch.randn(8, 32)
            assert rel(compiled(x), model(x)) < 1e-5
    counters = [g.runtime_info()["counters"] for g in be.report.graphs if g.runtime_info]
    assert sum(c["replays"] for c in counters) > 0


def _stack_run_three_times(layers: int):
    """A _Stack compiled piecewise and called three times (warm-up, capture, replay): (model, backend)."""
    torch.manual_seed(0)
    model = _Stack(layers=layers).eval()
    torch._dynamo.reset()
    be = kc.backend(graph_mode="piecewise")
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(8, 32))
    return model, compiled, be


def test_capture_sets_are_per_parameter_set_and_size():
    _, _, be = _stack_run_three_times(3)
    shared = [g for g in be.report.graphs if g.runtime_info and g.runtime_info()["counters"]["captures"]]
    # the graph after the break runs once per layer: three parameter sets, each captured once
    assert any(g.runtime_info()["counters"]["captures"] == 3 for g in shared)


def test_static_buffers_keep_the_inputs_strides():
    base = torch.randn(6, 10)
    sliced = base[:, 2:7]  # gaps between rows
    buf, copy = static_buffer_like(sliced)
    assert buf.stride() == sliced.stride() and torch.equal(buf, sliced)
    bcast = torch.randn(1, 5).expand(4, 5)
    buf, copy = static_buffer_like(bcast)
    assert buf.stride() == (0, 1) and torch.equal(buf, bcast) and copy.broadcast_dims == (0,)
    assert copy.source(torch.randn(4, 5)) is None  # no longer broadcast: cannot refill the one row
    with pytest.raises(ValueError, match="self-overlapping"):
        static_buffer_like(torch.randn(10).as_strided((4, 3), (1, 1)))


def test_a_strided_input_is_replayed_through_its_own_layout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 5))

        def forward(self, x):
            return torch.sigmoid(x @ self.w) * x

    torch.manual_seed(0)
    m = M().eval()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=kc.backend(graph_mode="full"), dynamic=False)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(8, 9)[:, 2:7]
            assert rel(compiled(x), m(x)) < 1e-6


# ---- the memory plan on constructed piece graphs ----------------------------------------------------

def _two_piece_graph():
    """x -> [piece 0: a = relu(x @ w); v = a.view(...)] -> [piece 1 (eager): s = sort(a)] -> outputs."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    mm = g.call_function(torch.ops.aten.mm.default, (x, w))
    a = g.call_function(torch.ops.aten.relu.default, (mm,))
    v = g.call_function(torch.ops.aten.view.default, (a, [-1]))
    s = g.call_function(torch.ops.aten.sort.default, (a,))
    s0 = g.call_function(operator.getitem, (s, 0))
    xv = g.call_function(torch.ops.aten.view.default, (x, [-1]))
    g.output((v, s0, a, xv))
    gm = fx.GraphModule(torch.nn.Module(), g)
    _Record(gm).run(torch.randn(4, 3), torch.randn(3, 3))
    return gm


class _Record(fx.Interpreter):
    """Real values as the nodes' meta values (what the splitter and planner read)."""

    def run_node(self, n):
        value = super().run_node(n)
        n.meta["val"] = value
        return value


def test_memory_plan_homes_copies_and_refusals():
    gm = _two_piece_graph()
    nodes = {n.name: n for n in gm.graph.nodes}
    reasons = {nodes["sort_default"]: SplitReason("host_sync", "aten::sort (planted)")}
    reasons.update(input_view_nodes(gm, frozenset({"w"})))
    assert set(n.name for n in reasons) == {"sort_default", "view_default_1"}  # x.view returned: kept out of captures
    split = split_graph(gm, reasons)
    kinds = [p.kind for p in split.pieces]
    assert kinds == ["graph", "eager", "eager"]
    plan = plan_memory(split, {0}, frozenset({"w"}))
    assert plan.values["relu_default"].home == "graph:0"
    assert plan.values["view_default"].home == "graph:0" and plan.values["view_default"].base == "relu_default"
    assert plan.values["getitem"].home == "call:1"
    assert plan.values["view_default_1"].home == "caller"
    copied = {c.index: c.group for c in plan.output_copies}
    # v (a view of relu) and relu itself are copied, as one storage; the sort result and the input view are not
    assert set(copied) == {0, 2} and copied[0] == copied[2]
    assert not plan.refusals
    assert any("relu_default: graph:0" in line for line in plan.describe())


def test_copying_outputs_keeps_their_aliasing():
    base = torch.randn(4, 6)
    view = base[:, 2:5]
    plan = plan_memory(split_graph(_two_piece_graph(), {}), {0}, frozenset())
    groups = [c for c in plan.output_copies]
    out = copy_outputs([view, base], [type(groups[0])(0, 0), type(groups[0])(1, 0)])
    assert out[0].untyped_storage().data_ptr() == out[1].untyped_storage().data_ptr()
    assert out[1].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert out[0].stride() == view.stride() and torch.equal(out[0], view) and torch.equal(out[1], base)


def test_a_piece_writing_its_input_in_place_is_not_captured():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    g.call_function(torch.ops.aten.add_.Tensor, (x, 1.0))
    g.output((y,))
    gm = fx.GraphModule(torch.nn.Module(), g)
    split = split_graph(gm, {})
    plan = plan_memory(split, {0}, frozenset())
    assert "writes its input x in place" in plan.refusals[0]


def test_outputs_held_by_the_caller_survive_later_replays():
    torch.manual_seed(0)
    model = _Stack(layers=2).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=kc.backend(graph_mode="piecewise"), dynamic=False)
    with torch.no_grad():
        held = [(x, compiled(x).clone(), compiled(x)) for x in (torch.randn(8, 32) for _ in range(5))]
        for x, first, second in held:
            assert torch.equal(first, second) and rel(second, model(x)) < 1e-5


# ---- padding proofs ------------------------------------------------------------------------------------

class _Scatter(nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, h))

    def forward(self, x, slots):
        h = x @ self.w
        return torch.zeros(16, h.shape[1]).scatter_add(0, slots[:, None].expand(-1, h.shape[1]), h) * 2


class _Repeat(nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, h))

    def forward(self, x):
        return (x @ self.w).repeat(2, 1) + 1


class _IndexAddBack(nn.Module):
    """Each token's two rows added back into its own row: mixes rows of the token dim."""

    def __init__(self, h=8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, 2 * h))

    def forward(self, x):
        y = (x @ self.w).view(-1, x.shape[1])
        idx = torch.arange(x.shape[0]).repeat_interleave(2)
        return torch.zeros_like(x).index_add(0, idx, y) + 1


class _TokenMajor(nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, 2 * h))

    def forward(self, x):
        return torch.relu((x @ self.w).view(-1, 2, x.shape[1]).reshape(-1, x.shape[1])) * 3


@pytest.mark.parametrize("model, inputs, refused", [
    (_Scatter, lambda t: (torch.randn(t, 8), torch.randint(0, 16, (t,))), "scatter_add writes token rows"),
    (_Repeat, lambda t: (torch.randn(t, 8),), "repeat tiles the token dim"),
    (_IndexAddBack, lambda t: (torch.randn(t, 8),), "index_add writes along the token dim"),
    (_TokenMajor, lambda t: (torch.randn(t, 8),), None),
])
def test_padding_is_proved_or_refused(model, inputs, refused):
    torch.manual_seed(0)
    m = model().eval()
    torch._dynamo.reset()
    compiled = kc.compile(m, dynamic=True, graph_mode="piecewise", capture_sizes=[1, 2, 4, 8])
    with torch.no_grad():
        for t in [3, 5, 6, 7, 3, 5, 7, 8, 8]:
            args = inputs(t)
            want, got = m(*args), compiled(*args)
            assert got.shape == want.shape and rel(got, want) < 1e-5
    info = compiled.kunlun_backend.report.graphs[-1].runtime_info()
    if refused:
        assert info["padding"].startswith("off") and refused in info["padding"]
        assert info["counters"]["padded_runs"] == 0
    else:
        assert info["padding"] == "on" and info["counters"]["padded_runs"] > 0


# ---- failures: per call, smallest unit -------------------------------------------------------------------

class _Rotary(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(32, 8))
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x, positions):
        return (x @ self.w) * self.table.index_select(0, positions)


def test_a_bad_input_raises_eagers_error_and_leaves_the_compiled_path_on():
    torch.manual_seed(0)
    m = _Rotary().eval()
    torch._dynamo.reset()
    be = kc.backend(graph_mode="full")
    compiled = torch.compile(m, backend=be, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            x, pos = torch.randn(4, 8), torch.randint(0, 32, (4,))
            compiled(x, pos)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(IndexError):
                compiled(torch.randn(4, 8), torch.tensor([0, 1, 2, 99]))
        assert not caught  # the caller's error, not the backend's: nothing to warn about
        x, pos = torch.randn(4, 8), torch.randint(0, 32, (4,))
        assert rel(compiled(x, pos), m(x, pos)) < 1e-6
    info = be.report.graphs[-1].runtime_info()
    assert info["counters"]["replays"] >= 2
    assert not be.report.graphs[-1].fallbacks  # the compiled graph was not turned off


def test_a_failing_piece_falls_back_for_that_call_only(monkeypatch):
    torch.manual_seed(0)
    model = _Stack(layers=2).eval()
    torch._dynamo.reset()
    be = kc.backend(graph_mode="piecewise")
    compiled = torch.compile(model, backend=be, dynamic=False)
    real_replay = CapturedPiece._replay
    failures = {"left": 1}

    def flaky(self, entry, args):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("planted replay failure")
        return real_replay(self, entry, args)

    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(8, 32))
        monkeypatch.setattr(CapturedPiece, "_replay", flaky)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.randn(8, 32)
            assert rel(compiled(x), model(x)) < 1e-5
        assert any("ran uncaptured for this call" in str(w.message) for w in caught)
        before = sum(g.runtime_info()["counters"]["replays"] for g in be.report.graphs if g.runtime_info)
        x = torch.randn(8, 32)
        assert rel(compiled(x), model(x)) < 1e-5
        after = sum(g.runtime_info()["counters"]["replays"] for g in be.report.graphs if g.runtime_info)
    assert after > before  # later calls replay again


# ---- the replay checker ---------------------------------------------------------------------------------

def test_the_replay_checker_names_a_stale_capture(monkeypatch):
    """A planted fault: replays stop refilling their input buffers.  The checker names the piece."""
    torch.manual_seed(0)
    model = _Stack(layers=2).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=kc.backend(graph_mode="piecewise", check_replays=True), dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(8, 32)
            assert rel(compiled(x), model(x)) < 1e-5  # the checker passes a correct runtime
        monkeypatch.setattr(torch, "_foreach_copy_", lambda targets, sources: None)
        monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: self)
        with pytest.raises(ReplayCheckError, match="piece"):
            compiled(torch.randn(8, 32))


def test_the_replay_checker_names_overwritten_memory(monkeypatch):
    """A planted fault: a later piece scribbles over a value an earlier piece made."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            a = torch.relu(x @ self.w)
            b = a.nonzero().shape[0]  # a host sync: splits the graph
            return a * 2 + b, (a @ self.w).sigmoid()

    m = M().eval()
    torch._dynamo.reset()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        compiled = torch.compile(m, backend=kc.backend(graph_mode="piecewise", check_replays=True), dynamic=False)
        with torch.no_grad():
            for _ in range(3):
                compiled(torch.randn(4, 16))
            real_run = CapturedPiece.run

            def scribbling(self, set_id, phase, args):
                made_by_piece_0 = [a for a in args if isinstance(a, torch.Tensor) and a.shape == (4, 16)]
                if not self.name.endswith("piece_0") and made_by_piece_0:  # still live: written over
                    made_by_piece_0[0].add_(1.0)
                return real_run(self, set_id, phase, args)

            monkeypatch.setattr(CapturedPiece, "run", scribbling)
            with pytest.raises(ReplayCheckError, match="overwritten"):
                compiled(torch.randn(4, 16))
    finally:
        torch._dynamo.config.capture_dynamic_output_shape_ops = False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("check", [False, True])
def test_a_graph_shared_by_layers_on_cuda_graphs(mode, check):
    torch.manual_seed(0)
    model = _Stack(h=256, layers=4).cuda().to(torch.bfloat16).eval()
    reference = _Stack(h=256, layers=4).cuda().double().eval()
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    be = kc.backend(graph_mode=mode, check_replays=check)
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for tokens in (16, 16, 16, 16, 64, 64, 64):
            x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
            want = reference(x.double())
            eager_err = rel(model(x), want)
            assert rel(compiled(x), want) <= 2 * eager_err + 1e-3
    assert sum(g.runtime_info()["counters"]["replays"] for g in be.report.graphs if g.runtime_info) > 0


def test_a_moved_parameter_is_a_new_capture_set():
    """`param.data = ...` keeps the Parameter object and moves its memory: the capture set is keyed by
    addresses, not by tensor identity (on CUDA the old capture would read the old memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU()).eval()
    be = kc.backend(graph_mode="full", capture_sizes=[4])
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            compiled(torch.randn(4, 16))
        model[0].weight.data = model[0].weight.data.clone() * 2
        for _ in range(3):
            x = torch.randn(4, 16)
            assert rel(compiled(x), model(x)) < 1e-6
    assert be.report.graphs[-1].runtime_info()["counters"]["captures"] == 2


def test_a_node_found_to_sync_becomes_a_split_and_the_rest_is_captured_again():
    """On CUDA, a warm-up that finds a node syncing with the host (a custom op no list names) tells the
    runtime, which splits the graph there from the next call.  Planted here through the same hook."""
    model, compiled, be = _stack_run_three_times(1)
    with torch.no_grad():
        rt = next(r for r in be.runtimes.values() if r.piecewise and r.piecewise.runners)
        calls = [n.name for n in rt.gm.graph.nodes if n.op == "call_function"]
        silu = calls[len(calls) // 2]  # a node in the middle of the piece
        assert rt._learn_sync(silu, "planted: syncs with the host")
        assert not rt._learn_sync("no_such_node", "planted")
        for _ in range(4):
            x = torch.randn(8, 32)
            assert rel(compiled(x), model(x)) < 1e-5
    info = rt.describe()
    assert info["split_at_host_syncs_found"] == {silu: "planted: syncs with the host"}
    assert any("planted" in p for p in info["pieces"]) and info["counters"]["replays"] > 0


def test_check_replays_from_the_environment(monkeypatch):
    from kunlun_compile.config import CompileConfig

    assert CompileConfig.from_options(environ={"KUNLUN_COMPILE_CHECK_REPLAYS": "1"}).check_replays
    assert not CompileConfig.from_options(environ={"KUNLUN_COMPILE_CHECK_REPLAYS": "no"}).check_replays
    with pytest.raises(ValueError):
        CompileConfig.from_options(environ={"KUNLUN_COMPILE_CHECK_REPLAYS": "maybe"})
