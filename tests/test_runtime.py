"""The graph runtime on the CPU: splitting, padding, modes, caps and counters (plain calls stand in
for CUDA graphs; tests/test_gpu_runtime.py captures for real)."""
import warnings

import pytest
import torch
from torch import nn

import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, builtin_names, make_inputs
from kunlun_compile.ops import cpu_kernels
from kunlun_compile.runtime.splitting import split_graph, splitting_nodes
from kunlun_compile.utils import KunlunCompileWarning


@pytest.fixture(autouse=True)
def op_references():
    """The runtime is under test here, not the kernels: ops run their torch references (fast on the CPU)."""
    with cpu_kernels(False):
        yield

SIZES = [4, 8, 16]
# every built-in model has 2 layers: graph | attention | graph | attention | graph
PIECES = ["piece 0: graph", "piece 1: eager, attention op kunlun_models::attention", "piece 2: graph",
          "piece 3: eager, attention op kunlun_models::attention", "piece 4: graph"]


def _run(name, mode, token_counts, **options):
    model, _ = build_model(name, seed=1, num_tokens=16)
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode=mode, capture_sizes=SIZES, **options)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in token_counts:
            ids, pos = make_inputs(BUILTIN_CONFIGS[name], t, generator=gen)
            got, want = compiled(ids, pos), model(ids, pos)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (graph,) = compiled.kunlun_backend.report.graphs
    return graph


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_models_split_at_attention_and_pad(name):
    # 16 exact (warm-up, capture, replay), 5 and 6 padded to 8, 20 above the largest size
    g = _run(name, "piecewise", [16, 16, 16, 5, 6, 5, 20])
    rt = g.runtime
    assert g.pieces == 5
    assert [p.split(",")[0] if "graph" in p else p for p in rt["pieces"]] == PIECES
    assert rt["padding"] == "on" and rt["graph_api"] == "plain calls"
    c = rt["counters"]
    assert c["piecewise_runs"] == 6 and c["padded_runs"] == 3 and c["uncaptured_runs"] == 1
    assert c["captures"] == 3 * 2  # 3 graph pieces x sizes 16 and 8
    assert c["replays"] == 3 * (2 + 2)  # 16: capture call + replay; 8: capture call + replay


@pytest.mark.parametrize("mode", ["none", "piecewise", "full", "full_and_piecewise"])
def test_every_mode_matches_eager(mode):
    g = _run("qwen3-next-tiny", mode, [8, 8, 8, 3, 3, 3, 16, 30, 1])
    c = g.runtime.get("counters", {})
    if mode == "none":
        assert g.runtime == {} or g.runtime["mode"] == "none"
    elif mode == "full":  # the whole graph at exact sizes only (attention cannot be padded)
        assert c["full_graph_runs"] == 4 and c["uncaptured_runs"] == 5 and c["padded_runs"] == 0
    elif mode == "full_and_piecewise":  # exact sizes as one graph, padded sizes piecewise
        assert c["full_graph_runs"] == 4 and c["piecewise_runs"] == 4 and c["padded_runs"] == 4
        assert c["uncaptured_runs"] == 1
    else:
        assert c["piecewise_runs"] == 8 and c["padded_runs"] == 4 and c["uncaptured_runs"] == 1


def test_user_splitting_op_adds_pieces():
    g = _run("qwen3-moe-tiny", "piecewise", [8, 8], splitting_ops=["kunlun::fused_moe"])
    assert g.pieces == 9
    assert sum("user splitting op kunlun::fused_moe" in p for p in g.runtime["pieces"]) == 2


class MixesTokens(nn.Module):
    """Subtracts the mean over tokens: a padded batch would change every real row."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(dim=0, keepdim=True)


def test_a_graph_that_mixes_tokens_is_never_padded():
    model = MixesTokens().eval()
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="piecewise", capture_sizes=[4, 8])
    with torch.no_grad():
        for t in [8, 8, 5, 5, 5, 4]:
            x = torch.randn(t, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    rt = compiled.kunlun_backend.report.graphs[0].runtime
    # the mean over tokens is a generated row kernel now: the runtime reads its KIR and sees the reduced dim
    assert rt["padding"].startswith("off: kunlun::pointwise") and "reduces along the token dim 0" in rt["padding"]
    assert rt["counters"]["padded_runs"] == 0 and rt["counters"]["uncaptured_runs"] == 3


def test_capture_cap_warns_once_and_runs_uncaptured():
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU()).eval()
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="piecewise", capture_sizes=[2, 4, 8],
                          max_captures_per_piece=1)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for t in [2, 2, 4, 4, 8, 8]:
            x = torch.randn(t, 16)
            torch.testing.assert_close(compiled(x), model(x))
    capped = [w for w in caught if issubclass(w.category, KunlunCompileWarning) and "max_captures" in str(w.message)]
    assert len(capped) == 1
    c = compiled.kunlun_backend.report.graphs[0].runtime["counters"]
    assert c["captures"] == 1 and c["uncaptured_runs"] == 4


def test_outputs_are_not_the_runtimes_buffers():
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU()).eval()
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="piecewise", capture_sizes=[4])
    with torch.no_grad():
        outs = [(x, compiled(x)) for x in (torch.randn(4, 16) for _ in range(4))]
        for x, y in outs:  # every earlier result still holds its own values
            torch.testing.assert_close(y, model(x))


def _host_sync_fn(x, w):
    h = x @ w
    idx = (h > 0).nonzero()
    return h.sum() + idx.shape[0], h * 2


def test_host_sync_ops_are_cut_out_and_pieces_chain_like_the_graph():
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(6, 8), torch.randn(8, 8)
    gm = make_fx(_host_sync_fn, tracing_mode="symbolic")(x, w)
    reasons = splitting_nodes(gm, (), "cpu")
    assert sorted(map(str, reasons.values())) == ["host sync aten::nonzero"]
    split = split_graph(gm, reasons)
    assert [p.kind for p in split.pieces] == ["graph", "eager", "graph"]
    env = dict(zip(split.graph_inputs, (x, w)))
    for p in split.pieces:
        env.update(zip(p.outputs, p.gm(*[env[n] for n in p.inputs])))
    got = [env[n] for n in split.graph_outputs]
    want = _host_sync_fn(x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [dict(graph_mode="fast"), dict(capture_sizes=[0, 4]), dict(capture_sizes=[]),
                                 dict(max_captures_per_piece=0), dict(debug_graph_addresses="yes")])
def test_bad_runtime_options(bad):
    with pytest.raises((ValueError, TypeError)):
        kc.backend(**bad)


def test_report_and_cli_json_show_the_runtime():
    g = _run("llama-tiny", "piecewise", [4, 4, 4])
    d = g.as_dict()
    assert d["runtime"]["counters"]["replays"] == 3 * 2 and d["pieces"] == 5
    assert "runtime: piecewise (plain calls), padding on" in str(g)
