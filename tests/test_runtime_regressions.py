"""Regressions of the graph runtime: a decode stack (tests/decode_stack.py) and small models that each
reproduce one divergence the runtime fuzzer (tests/runtime_fuzz.py) found, compared with eager in every
graph mode over repeated calls with fresh inputs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kunlun_compile as kc
from kunlun_compile.ops import cpu_kernels

from . import decode_stack as ds
from .conftest import STRICT

MODES = ["none", "piecewise", "full", "full_and_piecewise"]
CPU_BATCHES = [1, 4, 8]
GPU_BATCHES = [1, 16, 64]
FP32_TOL = 1e-4
BF16_TOL = 2e-2


@pytest.fixture(autouse=True)
def op_references():
    """The runtime is under test, not the kernels: on the CPU the kunlun:: ops run their torch references."""
    with cpu_kernels(False):
        yield


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm()).item()


class _Calls:
    """Compares calls with eager and keeps what the caller holds, to check later replays left it alone."""

    def __init__(self, tol: float):
        self.tol = tol
        self.errors = []  # (label, error) beyond tolerance
        self.held = []  # (label, returned tensor, its values then)

    def check(self, label: str, got: torch.Tensor, want: torch.Tensor) -> None:
        err = _rel(got, want)
        if not err <= self.tol:
            self.errors.append((label, err))
        self.held.append((label, got, got.clone()))

    def run(self, compiled, model, shapes, seed: int) -> None:
        """Call both with fresh inputs of each shape in turn (no grad), checking every call, then finish."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for call, shape in enumerate(shapes):
                x = torch.randn(*shape, generator=gen)
                self.check(f"call {call} shape {tuple(shape)}", compiled(x), model(x))
        self.finish()

    def finish(self) -> None:
        overwritten = [label for label, t, then in self.held if not torch.equal(t, then)]
        assert not self.errors, "beyond tolerance: " + ", ".join(f"{where} rel_err {e:.3e}" for where, e in self.errors)
        assert not overwritten, f"outputs changed by later calls: {overwritten}"


# ---- the decode stack --------------------------------------------------------------------------------

def _run_stack(cfg, mode, batches, device, dtype, tol, calls=3, **options):
    model = ds.build(cfg, device, dtype)
    compiled = torch.compile(model, backend=kc.backend(graph_mode=mode, **STRICT, **options), dynamic=False)
    gen = torch.Generator().manual_seed(11)
    record = _Calls(tol)
    with torch.no_grad():
        for batch in batches:
            for call in range(calls):  # fresh inputs every call
                inputs = ds.make_inputs(cfg, batch, gen, device, dtype)
                record.check(f"batch {batch} call {call}", compiled(*inputs), model(*inputs))
    record.finish()
    return compiled


@pytest.mark.parametrize("mode", MODES)
def test_decode_stack_matches_eager(mode):
    _run_stack(ds.CPU_CONFIG, mode, CPU_BATCHES, "cpu", torch.float32, FP32_TOL)


@pytest.mark.parametrize("mode", MODES[1:])
def test_decode_stack_with_captured_dynamic_shapes_matches_eager(mode):
    """bincount inside the graph (no graph break): one graph for the whole stack."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        _run_stack(ds.CPU_CONFIG, mode, CPU_BATCHES, "cpu", torch.float32, FP32_TOL)


@pytest.mark.parametrize("mode", MODES[1:])
def test_decode_stack_with_growing_kv_cache_matches_eager(mode):
    """HF generate: one dynamic graph, the KV length grows by one every step, the batch changes."""
    cfg = ds.CPU_CONFIG
    model = ds.build(cfg)
    compiled = kc.compile(model, dynamic=True, graph_mode=mode, capture_sizes=[1, 2, 4, 8], **STRICT)
    gen = torch.Generator().manual_seed(12)
    record = _Calls(FP32_TOL)
    with torch.no_grad():
        for step, batch in enumerate([4, 4, 4, 4, 3, 3, 3, 8, 8]):
            inputs = ds.make_inputs(cfg, batch, gen, cache_len=cfg.cache_len + step)
            record.check(f"step {step} batch {batch}", compiled(*inputs), model(*inputs))
    record.finish()


def test_decode_stack_expert_spellings_agree():
    """The model itself: the expert spellings compute the same thing (eager)."""
    gen = torch.Generator().manual_seed(3)
    inputs = ds.make_inputs(ds.CPU_CONFIG, 5, gen)
    with torch.no_grad():
        outs = {impl: ds.build(dataclasses.replace(ds.CPU_CONFIG, experts_impl=impl))(*inputs)
                for impl in ("gather_bmm", "loop")}
        bf16 = {impl: ds.build(dataclasses.replace(ds.CPU_CONFIG, experts_impl=impl), dtype=torch.bfloat16)(
            inputs[0].bfloat16(), inputs[1], [c.bfloat16() for c in inputs[2]]) for impl in ("grouped_mm", "loop")}
    assert _rel(outs["gather_bmm"], outs["loop"]) < 1e-6
    assert _rel(bf16["grouped_mm"], bf16["loop"]) < 1e-2


def _bf16_tolerance(cfg, device, batches) -> float:
    """bf16: the README's 2e-2, or three times eager's own error against float64 if that is larger."""
    model16 = ds.build(cfg, device, torch.bfloat16)
    model64 = ds.build(dataclasses.replace(cfg, experts_impl="loop"), device, torch.float64)
    gen = torch.Generator().manual_seed(11)
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            x, pos, caches = ds.make_inputs(cfg, batch, gen, device, torch.float64)
            want = model64(x, pos, caches)
            got = model16(x.bfloat16(), pos, [c.bfloat16() for c in caches])
            worst = max(worst, _rel(got, want))
    return max(BF16_TOL, 3 * worst)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_decode_stack_matches_eager(mode):
    tol = _bf16_tolerance(ds.GPU_CONFIG, "cuda", GPU_BATCHES)
    _run_stack(ds.GPU_CONFIG, mode, GPU_BATCHES, "cuda", torch.bfloat16, tol)


# ---- small reproductions -----------------------------------------------------------------------------

class BreakInEveryLayer(nn.Module):
    """A graph break inside each layer: Dynamo compiles one graph and every layer calls it with its own
    weights."""

    def __init__(self, layers=3, hidden=32):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.w = nn.ParameterList(nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5,
                                               requires_grad=False) for _ in range(2 * layers))

    def layer(self, x, a, b):
        h = F.silu(x @ a)
        torch._dynamo.graph_break()
        return x + h @ b

    def forward(self, x):
        for i in range(0, len(self.w), 2):
            x = self.layer(x, self.w[i], self.w[i + 1])
        return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_a_graph_shared_by_layers_uses_each_layers_weights(mode, dynamic):
    model = BreakInEveryLayer().eval()
    compiled = kc.compile(model, dynamic=dynamic, graph_mode=mode, capture_sizes=[1, 2, 4, 8], **STRICT)
    _Calls(FP32_TOL).run(compiled, model, [(tokens, 32) for tokens in [4, 4, 4, 3, 3, 3, 12, 4]], seed=1)


class SequenceMajor(nn.Module):
    """HF layout, batch 1: [1, seq, hidden]; the varying size is dim 1, dim 0 is always 1."""

    def __init__(self, hidden=32):
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        self.a = nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5, requires_grad=False)

    def forward(self, x):
        return F.rms_norm(x + F.gelu(x @ self.a), (x.shape[-1],))


@pytest.mark.parametrize("mode", MODES[1:])
def test_sequence_major_inputs_whose_length_varies(mode):
    model = SequenceMajor().eval()
    compiled = kc.compile(model, dynamic=True, graph_mode=mode, capture_sizes=[1, 2, 4, 8], **STRICT)
    _Calls(FP32_TOL).run(compiled, model, [(1, seq, 32) for seq in [4, 4, 4, 6, 6, 6, 11, 4]], seed=2)


def test_a_list_of_tensors_crossing_pieces_is_refreshed_on_replay():
    """A `split` whose getitems sit after a cut hands the next piece a list of tensors (the decode
    stack's growing-KV graph has one, after decode_linear's rewrite).  Replays must read this call's
    tensors from it, not the ones of the capture call."""
    import operator

    from torch.fx.experimental.proxy_tensor import make_fx

    from kunlun_compile.runtime import GraphRuntime

    aten = torch.ops.aten
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(4))

    def f(w, x):
        parts = aten.split.Tensor(aten.mm.default(x, w), 16, 1)
        s = aten.sigmoid.default(x)
        return (aten.add.Tensor(aten.mul.Tensor(parts[0], aten.slice.Tensor(s, 1, 0, 16)), parts[1]),)

    gm = make_fx(f, tracing_mode="fake")(w, torch.randn(4, 32))
    cut = next(n for n in gm.graph.nodes if n.target is aten.sigmoid.default)
    for n in [n for n in gm.graph.nodes if n.target is operator.getitem]:
        cut.append(n)  # the getitems after the cut: the list itself crosses into the next piece
    gm.recompile()
    vals = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]
    rt = GraphRuntime("g", gm, vals, {0}, mode="piecewise", capture_sizes=[4], splitting_ops=["aten::sigmoid"],
                      max_captures=8, check_replays=False, warned=set(), strict=True)
    record = _Calls(FP32_TOL)
    gen = torch.Generator().manual_seed(8)
    for call in range(4):  # warm-up, capture, replays
        x = torch.randn(4, 32, generator=gen)
        record.check(f"call {call}", rt(w, x)[0], f(w, x)[0])
    record.finish()


class SqueezeAfterBreak(nn.Module):
    """[tokens, hidden] made [1, tokens, hidden] for the layers, squeezed back after them; the graph break
    hands the next graph the batch dim of 1 as an input size."""

    def __init__(self, hidden=32):
        super().__init__()
        gen = torch.Generator().manual_seed(9)
        self.a = nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5, requires_grad=False)

    def forward(self, x):
        h = F.silu(x.unsqueeze(0) @ self.a)
        torch._dynamo.graph_break()
        out = F.rms_norm(h, (h.shape[-1],)).squeeze(0)
        return out.view(out.shape[0], 4, -1), out[..., :8]


@pytest.mark.parametrize("mode", MODES)
def test_squeezed_batch_of_one_after_a_graph_break(mode):
    """Found by the fuzzer in every mode, `none` included: under kunlun_compile.compile(dynamic=True)
    (size-oblivious tracing) the squeeze(0) of the batch dim of 1 that crosses the graph break is traced
    as a no-op, in Dynamo's graph as in ours; the call would return a wrongly shaped view.  It must raise a
    clear error naming the cause rather than crash deep inside (or return a wrong result); plain
    torch.compile(dynamic=True) specialises the 1 and is right."""
    from kunlun_compile.runtime.executor import SizeAssumptionBroken

    model = SqueezeAfterBreak().eval()
    compiled = kc.compile(model, dynamic=True, graph_mode=mode, capture_sizes=[1, 2, 4, 8], **STRICT)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad(), pytest.raises(SizeAssumptionBroken, match="squeezes a dim of size"):
        compiled(torch.randn(4, 32, generator=gen))
    torch._dynamo.reset()
    plain = torch.compile(model, backend=kc.backend(graph_mode=mode, capture_sizes=[1, 2, 4, 8], **STRICT),
                          dynamic=True)
    with torch.no_grad():
        for tokens in [4, 4, 4, 3, 9]:
            x = torch.randn(tokens, 32, generator=gen)
            for got, want in zip(plain(x), model(x)):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=FP32_TOL, atol=1e-5)

class SortedExperts(nn.Module):
    """Top-2 of 4 experts through torch._grouped_mm over argsort-ed tokens.  Dynamo breaks the graph at
    bincount (a data-dependent size), so the graph after it starts from inputs like `order` [tokens * 2]."""

    def __init__(self, hidden=32, inter=48, experts=4):
        super().__init__()
        gen = torch.Generator().manual_seed(10)
        self.router = nn.Parameter(torch.randn(experts, hidden, generator=gen) / hidden ** 0.5, requires_grad=False)
        self.w1 = nn.Parameter(torch.randn(experts, hidden, inter, generator=gen) / hidden ** 0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(experts, inter, hidden, generator=gen) / inter ** 0.5, requires_grad=False)

    def forward(self, x):
        weights, ids = F.linear(x, self.router).softmax(-1).topk(2, dim=-1)
        order = ids.reshape(-1).argsort(stable=True)
        offs = torch.bincount(ids.reshape(-1), minlength=self.w1.shape[0]).cumsum(0).to(torch.int32)
        rows = order // 2
        y = torch._grouped_mm(F.silu(torch._grouped_mm(x[rows], self.w1, offs=offs)), self.w2, offs=offs)
        return torch.zeros_like(x).index_add_(0, rows, y * weights.reshape(-1)[order, None])


@pytest.mark.parametrize("mode", ["piecewise", "full_and_piecewise"])
def test_padding_after_a_data_dependent_graph_break(mode):
    """Before a14ed22: at a padded size the graph after the break was padded along `order`'s dim 0
    (tokens * 2 rows) as if it were the token count: IndexError, index 3 out of bounds for size 3.
    bf16: _grouped_mm's meta function takes nothing else."""
    model = SortedExperts().eval().to(torch.bfloat16)
    compiled = kc.compile(model, dynamic=True, graph_mode=mode, capture_sizes=[1, 2, 4, 8], **STRICT)
    record = _Calls(BF16_TOL)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for call, tokens in enumerate([4, 4, 4, 3, 3, 3, 12, 3]):
            x = torch.randn(tokens, 32, generator=gen).to(torch.bfloat16)
            record.check(f"call {call} tokens {tokens}", compiled(x), model(x))
    record.finish()
