"""The parts of the vLLM integration that need no vLLM: options, duplicate splits, recorded op references,
warm starts (stored transformed graphs) and worker reports."""
import collections
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.fx as fx

from kunlun_compile.capture.graph_io import graph_from_data, graph_to_data
from kunlun_compile.passes.cleanup import merge_duplicates
from kunlun_compile.vllm.options import config_from_vllm, options_from_vllm


def test_options_come_from_inductor_compile_config_and_default_to_no_graph_runtime():
    assert options_from_vllm({}) == {"graph_mode": "none"}
    config = config_from_vllm({"enable_auto_functionalized_v2": False,
                               "kunlun": {"fast_math": True, "disable": ["moe_ffn"], "dump_dir": "/tmp/x"}})
    assert (config.fast_math, config.disable, config.dump_dir, config.graph_mode) == (True, ("moe_ffn",), "/tmp/x",
                                                                                       "none")
    assert config_from_vllm({"kunlun": {"graph_mode": "full"}}).graph_mode == "full"
    with pytest.raises(ValueError, match="unknown option"):
        config_from_vllm({"kunlun": {"fastmath": True}})
    with pytest.raises(TypeError, match="dict of options"):
        config_from_vllm({"kunlun": "fast_math"})


def _two_splits(x):
    a = torch.ops.aten.split_with_sizes.default(x, [4, 2, 2], -1)
    b = torch.ops.aten.split_with_sizes.default(x, [4, 2, 2], -1)
    c = torch.ops.aten.split_with_sizes.default(x, [2, 2, 4], -1)  # other sizes: a different split
    return a[0] + 1, b[1] * 2, c[2]


def _merged(fn, x, merges: int) -> fx.GraphModule:
    """`fn` traced, its duplicates merged (exactly `merges` of them), computing what it computed before."""
    gm = fx.symbolic_trace(fn)
    want = gm(x)
    assert merge_duplicates(gm) == merges
    gm.recompile()
    for w, g in zip(want, gm(x)):
        torch.testing.assert_close(g, w)
    return gm


def test_duplicate_splits_merge_and_nothing_else():
    gm = _merged(_two_splits, torch.randn(3, 8), merges=1)
    splits = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert len(splits) == 2


def test_recorded_graph_keeps_op_references_and_higher_order_ops():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.higher_order.auto_functionalized_v2,
                               (torch.ops.aten.add_.Tensor,), {"self": x})
    graph.output(node)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    data, tensors = graph_to_data(gm)
    back = graph_from_data(data, tensors)
    (call,) = [n for n in back.graph.nodes if n.op == "call_function"]
    assert call.target is torch.ops.higher_order.auto_functionalized_v2
    assert call.args[0] is torch.ops.aten.add_.Tensor


# ---- warm starts (kunlun_compile/vllm/warm_start.py): the pass pipeline's output stored and loaded ----

class NormGate(torch.nn.Module):
    """A residual add + RMSNorm (a fused kernel) and a SiLU gate (a generated element-wise kernel)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64), requires_grad=False)

    def forward(self, x, residual, gate):
        h = x + residual
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * self.weight
        return torch.nn.functional.silu(gate) * normed, h


INPUTS = (torch.randn(8, 64), torch.randn(8, 64), torch.randn(8, 64))


def _start(store_dir, expected=None):
    """One 'process start': a fresh backend and Dynamo, compiled inside a warm-start block as vLLM's
    compile/load calls do.  (outputs, stats, report, kunlun warnings, the graph's entry key)"""
    import kunlun_compile as kc
    from kunlun_compile.vllm.graph_store import GraphStore
    from kunlun_compile.vllm.warm_start import WarmStartStats, install, warm_start

    torch._dynamo.reset()
    backend = kc.backend(strict=True)
    install(backend)
    stats = WarmStartStats()
    with warm_start(GraphStore(str(store_dir)), expected, stats, backend.warned) as session, \
            torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)  # the same weights at every start
        out = torch.compile(NormGate(), backend=backend, dynamic=True)(*INPUTS)
    messages = [str(w.message) for w in caught if "kunlun" in str(w.message)]
    return out, stats, backend.report, messages, session.key


@pytest.fixture
def cold(tmp_path):
    return tmp_path, _start(tmp_path)


def test_warm_start_loads_the_transformed_graph_and_runs_no_pass(cold):
    store_dir, (want, cold_stats, cold_report, cold_warnings, key) = cold
    assert (cold_stats.compiled, cold_stats.loaded, cold_warnings) == (1, 0, [])
    (entry,) = os.listdir(store_dir)
    assert entry == key
    payload = json.load(open(store_dir / key / "entry.json"))["payload"]
    assert len(payload["kernels"]) >= 1  # the generated kernel's KIR travels with the graph
    got, stats, report, messages, warm_key = _start(store_dir)
    assert (stats.compiled, stats.loaded, messages, warm_key) == (0, 1, [], key)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # the report reads as the cold one did: the same passes, matches and kernels; no pass time spent
    (cold_graph,), (graph,) = cold_report.graphs, report.graphs
    assert graph.patterns == cold_graph.patterns and graph.patterns["add_rmsnorm"] == 1
    assert graph.kernels == cold_graph.kernels and graph.kernels["pointwise"] >= 1
    assert [p.name for p in graph.passes] == [p.name for p in cold_graph.passes]
    assert all(p.time_ms == 0.0 for p in graph.passes)


def test_corrupt_entry_is_compiled_again_with_one_warning(cold):
    store_dir, (want, _, _, _, key) = cold
    entry = store_dir / key / "entry.json"
    entry.write_text(entry.read_text()[:500])  # a write cut short
    got, stats, _, messages, _ = _start(store_dir, expected=key)
    assert (stats.compiled, stats.loaded) == (1, 0)
    (message,) = messages
    assert "compiled again" in message and "corrupt" in message and key in message
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    _, stats, _, messages, _ = _start(store_dir, expected=key)  # the entry was written anew
    assert (stats.compiled, stats.loaded, messages) == (0, 1, [])


def test_altered_entry_fails_its_checksum(cold):
    store_dir, (_, _, _, _, key) = cold
    entry = store_dir / key / "entry.json"
    doc = json.loads(entry.read_text())
    doc["payload"]["records"][0]["matches"] += 1  # valid JSON, wrong content
    entry.write_text(json.dumps(doc))
    _, stats, _, (message,), _ = _start(store_dir, expected=key)
    assert stats.compiled == 1 and "checksum mismatch" in message


def test_handle_naming_an_entry_of_another_torch_names_the_difference(cold):
    """vLLM's handle names the entry made at the last start; made with another torch, the graph is
    compiled again and the warning says what changed."""
    store_dir, (_, _, _, _, key) = cold
    old_entry = json.loads((store_dir / key / "entry.json").read_text())
    old_entry["components"]["torch"] = "2.0.0"
    old_key = "0" * 32
    os.makedirs(store_dir / old_key)
    (store_dir / old_key / "entry.json").write_text(json.dumps(old_entry))
    shutil.rmtree(store_dir / key)
    _, stats, _, (message,), new_key = _start(store_dir, expected=old_key)
    assert stats.compiled == 1 and new_key == key
    assert f"made with torch 2.0.0 -> {torch.__version__}" in message


def test_worker_reports_round_trip(tmp_path):
    from kunlun_compile.report import CompileReport, GraphReport, PassRecord
    from kunlun_compile.vllm.reports import find_reports, format_reports, latest_run, select, write_report

    report = CompileReport([GraphReport("graph_0", passes=[PassRecord("add_rmsnorm", "", 10, 8, 1,
                                                                      patterns={"add_rmsnorm": 1})])])
    old = tmp_path / "cache" / "aaa" / "rank_0_0"
    write_report([str(old)], rank=0, report=report, model="m")
    for rank in (1, 0):  # a later engine with two ranks
        write_report([str(tmp_path / "cache" / "bbb" / f"rank_{rank}_0")], rank=rank, report=report,
                     warm_start={"compiled": 0, "loaded": 1, "events": []}, model="m")
    (tmp_path / "cache" / "ccc").mkdir()
    (tmp_path / "cache" / "ccc" / "kunlun_report.json").write_text("{")  # unreadable: listed, not hidden
    found = find_reports(str(tmp_path / "cache"))
    assert len(found) == 4 and any("error" in r for r in found)
    latest = latest_run([r for r in found if "error" not in r])
    assert [(r["rank"], os.path.basename(os.path.dirname(os.path.dirname(r["path"])))) for r in latest] == \
        [(0, "bbb"), (1, "bbb")]
    assert latest[0]["summary"]["patterns"]["add_rmsnorm"] == 1
    text = format_reports(latest)
    assert "rank 0" in text and "rank 1" in text and "add_rmsnorm 1" in text and "1 loaded" in text
    # what the CLI verb prints: the last engine's ranks, and the unreadable file named, not hidden
    shown = select(str(tmp_path / "cache"))
    assert [r.get("rank") for r in shown] == [0, 1, None] and shown[2]["error"]
    assert len(select(str(tmp_path / "cache"), all_runs=True)) == 4


def _replayed_views(x):
    # functionalization re-creates a view of a written buffer at each use (vLLM's CPU linears)
    v1, v2 = torch.ops.aten.view.default(x, [2, 12]), torch.ops.aten.view.default(x, [2, 12])
    s1, s2 = torch.ops.aten.slice.Tensor(v1, 1, 0, 4), torch.ops.aten.slice.Tensor(v2, 1, 0, 4)
    u1, u2 = torch.ops.aten.unsqueeze.default(x, 0), torch.ops.aten.unsqueeze.default(x, 0)
    return s1 + 1, s2 * 2, u1 * 3, u2 * 4


def test_equal_views_and_slices_merge_but_not_unsqueezes():
    """Patterns spell one `unsqueeze` per use (q's and k's cos), and a pattern node matches one graph node."""
    gm = _merged(_replayed_views, torch.randn(4, 6), merges=2)
    count = collections.Counter(n.target for n in gm.graph.nodes)
    assert (count[torch.ops.aten.view.default], count[torch.ops.aten.slice.Tensor],
            count[torch.ops.aten.unsqueeze.default]) == (1, 1, 2)
