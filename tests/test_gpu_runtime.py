"""The graph runtime with real CUDA graphs (skipped without CUDA): every mode equals eager across
sizes, held outputs survive later replays, a non-capturable piece falls back, memory stays flat."""
import warnings

import pytest
import torch
from torch import nn

import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs
from kunlun_compile.utils import KunlunCompileWarning

pytestmark = pytest.mark.gpu
SIZES = [1, 2, 4, 8, 16]


def _compiled(name, mode, **options):
    model, _ = build_model(name, device="cuda", seed=2, num_tokens=16)
    return model, kc.compile(model, dynamic=True, strict=True, graph_mode=mode, capture_sizes=SIZES, **options)


@pytest.mark.parametrize("mode", ["piecewise", "full", "full_and_piecewise"])
@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "qwen3-next-tiny"])
def test_capture_and_replay_equal_eager(name, mode):
    model, compiled = _compiled(name, mode)
    gen = torch.Generator().manual_seed(5)
    held = []
    with torch.no_grad():
        for t in [8, 8, 8, 8, 3, 3, 3, 3, 16, 16, 16, 1, 1, 1, 5, 5, 5, 40]:  # fresh inputs every call
            ids, pos = make_inputs(BUILTIN_CONFIGS[name], t, device="cuda", generator=gen)
            got, want = compiled(ids, pos), model(ids, pos)
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
            held.append((got, want))
    for got, want in held:  # no later replay wrote into a result the caller holds
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    rt = compiled.kunlun_backend.report.graphs[0].runtime
    assert rt["graph_api"] == "cuda graphs" and rt["counters"]["capture_failures"] == 0
    assert rt["counters"]["captures"] > 0 and rt["counters"]["replays"] > 0
    if mode != "full":
        assert rt["counters"]["padded_runs"] == 7  # 3 -> 4, 5 -> 8


@torch.library.custom_op("kunlun_test::reads_on_host", mutates_args=())
def reads_on_host(x: torch.Tensor) -> torch.Tensor:
    scale = float(x.abs().max().item())  # a host read: illegal while a stream is capturing
    return x / (scale + 1.0)


@reads_on_host.register_fake
def _(x):
    return torch.empty_like(x)


class HostReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.b(torch.ops.kunlun_test.reads_on_host(torch.relu(self.a(x))))


def test_a_node_that_syncs_at_warm_up_becomes_a_split_point():
    """The host read is found at warm-up (not at capture, where it would break the stream): the graph is
    split there and captured again around it, values as eager, no warning (nothing fell back)."""
    model = HostReader().cuda().eval()
    compiled = kc.compile(model, dynamic=True, graph_mode="piecewise", capture_sizes=[4, 8])
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for t in [4, 4, 4, 8, 8, 8]:
            x = torch.randn(t, 32, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    mine = [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)]
    assert not mine, mine
    rt = compiled.kunlun_backend.report.graphs[0].runtime
    found = rt["split_at_host_syncs_found"]
    assert len(found) == 1 and "reads_on_host" in next(iter(found.values())), found
    assert rt["counters"]["capture_failures"] == 0 and rt["counters"]["replays"] >= 1, rt["counters"]


def test_memory_is_flat_over_replays():
    model, compiled = _compiled("qwen3-moe-tiny", "piecewise")
    gen = torch.Generator().manual_seed(9)
    inputs = [make_inputs(BUILTIN_CONFIGS["qwen3-moe-tiny"], t, device="cuda", generator=gen) for t in (3, 8, 16)]
    with torch.no_grad():
        def steps(n):
            for i in range(n):
                out = compiled(*inputs[i % 3])
                del out
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        after_10 = steps(10)
        after_1000 = steps(1000)
    assert after_1000 == after_10


def test_a_parameter_that_moves_gets_a_capture_of_its_own():
    """Captures read parameters in place: the addresses are part of the capture set's key, so a moved
    parameter is read where it is now (the debug option that used to check this is now the replay
    checker)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU()).cuda().eval()
    be = kc.backend(strict=True, graph_mode="piecewise", capture_sizes=[4], debug_graph_addresses=True)
    compiled = torch.compile(model, backend=be, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 16, device="cuda")
            torch.testing.assert_close(compiled(x), model(x))
        model[0].weight.data = model[0].weight.data.clone() * 2  # the parameter moves, and changes
        for _ in range(3):
            x = torch.randn(4, 16, device="cuda")
            torch.testing.assert_close(compiled(x), model(x))
    counters = be.report.graphs[-1].runtime_info()["counters"]
    assert counters["captures"] == 2 and counters["replays"] >= 3


def test_inside_a_callers_cuda_graph_the_runtime_steps_aside():
    """A caller capturing its own CUDA graph around the compiled model (vLLM's cudagraph wrapper, a
    benchmark) gets the kernels in its graph; replaying ours inside a capture is illegal."""
    model, compiled = _compiled("qwen3-moe-tiny", "piecewise")
    ids, pos = make_inputs(BUILTIN_CONFIGS["qwen3-moe-tiny"], 8, device="cuda",
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(3):  # warm-up, capture, replay of our own graphs
            compiled(ids, pos)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            compiled(ids, pos)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = compiled(ids, pos)
        g.replay()
        torch.testing.assert_close(out, model(ids, pos), rtol=2e-4, atol=2e-4)
    assert compiled.kunlun_backend.report.graphs[0].runtime["counters"]["uncaptured_runs"] >= 1


_COLD_FIRST_CALL = """
import threading, json, torch, triton.compiler
import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs
seen = []
real = triton.compiler.compile
def counting(src, *a, **k):
    seen.append((threading.current_thread() is threading.main_thread(), getattr(src, "name", "?")))
    return real(src, *a, **k)
triton.compiler.compile = counting
model, _ = build_model("qwen3-moe-tiny", device="cuda", seed=2, num_tokens=16)
compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="piecewise", capture_sizes=[1, 2, 4])
with torch.no_grad():
    for t in (3, 3, 3, 1):
        ids, pos = make_inputs(BUILTIN_CONFIGS["qwen3-moe-tiny"], t, device="cuda",
                               generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=2e-4, atol=2e-4)
rt = compiled.kunlun_backend.report.graphs[0].runtime
print(json.dumps({"compiles": seen, "ahead": rt["kernels_compiled_ahead_for"], "skips": rt["precompile_skips"]}))
"""


def test_fused_kernels_compile_ahead_in_parallel(tmp_path):
    """On empty caches, the first call at a size compiles the fused ops' kernels on the precompile's
    worker threads; the call itself (main thread) compiles none of them (the models' own attention
    kernel is not a fused op and still compiles at its launch)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), KUNLUN_COMPILE_CACHE_DIR=str(tmp_path / "kc"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, "-c", _COLD_FIRST_CALL], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["ahead"] == 2 and out["skips"] == []  # sizes 4 (3 padded) and 1
    in_workers = [name for main, name in out["compiles"] if not main]
    in_call = [name for main, name in out["compiles"] if main and "attention" not in name]
    assert len(in_workers) >= 5 and in_call == [], out["compiles"]
