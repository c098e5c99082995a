"""The calls `runtime/precompile.py` makes ahead of a first run: every `kunlun::` call of the compiled
graph, with tensors shaped, strided and typed exactly as the real run passes them (else the kernels it
compiles would be other specializations than the ones the run launches).  The compiling itself needs
CUDA: tests/test_gpu_runtime.py."""
import pytest
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs
from kunlun_compile.ops import cpu_kernels
from kunlun_compile.runtime import piecewise
from kunlun_compile.runtime.precompile import _is_fused_op, fused_calls


def _meta(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), tuple(x.stride()), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return tuple(_meta(v) for v in x)
    return x


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.seen = {}

    def run_node(self, n):
        if _is_fused_op(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.seen[n.name] = (_meta(args), _meta(kwargs))
        return super().run_node(n)


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "qwen3-next-tiny"])
def test_precompile_calls_match_the_real_run(name, monkeypatch):
    runs = []
    real_call = piecewise.GraphRuntime.__call__

    def recording(self, *args):
        runs.append((self, args))
        return real_call(self, *args)

    monkeypatch.setattr(piecewise.GraphRuntime, "__call__", recording)
    model, _ = build_model(name, seed=1, num_tokens=16)
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="piecewise", capture_sizes=[4, 8])
    with torch.no_grad(), cpu_kernels(False):
        for t in (8, 5):
            ids, pos = make_inputs(BUILTIN_CONFIGS[name], t, generator=torch.Generator().manual_seed(t))
            compiled(ids, pos)
        for rt, args in runs:
            recorder = _Recorder(rt.gm)
            recorder.run(*args)
            ahead = {node.name: (_meta(a), _meta(kw)) for node, a, kw in
                     fused_calls(rt.gm, args, rt.static_input_indices, rt.bind_symbols(args))}
            assert len(ahead) >= 5 and ahead.keys() == recorder.seen.keys()
            for node_name, want in recorder.seen.items():
                assert ahead[node_name] == want, node_name
            # parameters are passed as themselves (no copies of the weights)
            params = {id(a) for i, a in enumerate(args) if i in rt.static_input_indices}
            leaves = [x for _, a, kw in fused_calls(rt.gm, args, rt.static_input_indices, rt.bind_symbols(args))
                      for x in tree_leaves((a, kw))]
            assert any(id(x) in params for x in leaves)


def test_precompile_runs_once_per_size_the_kernels_see_and_stops_at_the_cap(monkeypatch):
    """The runtime's check on every call: a new padded size (or unpadded token count) walks the graph once;
    a size already done, or any size past MAX_PRECOMPILED_SIZES, does not."""
    walks = []
    monkeypatch.setattr(piecewise, "precompile_fused_kernels",
                        lambda gm, args, static, bindings, on_skip=None: walks.append(dict(bindings)) or 0)
    runs = []
    real_call = piecewise.GraphRuntime.__call__

    def on_cuda_call(self, *args):  # the check runs only on CUDA; the pieces still run as plain CPU calls
        runs.append(self)
        self.on_cuda = True
        try:
            return real_call(self, *args)
        finally:
            self.on_cuda = False

    monkeypatch.setattr(piecewise.GraphRuntime, "__call__", on_cuda_call)
    monkeypatch.setattr(piecewise.GraphRuntime, "graph_api_capturing", staticmethod(lambda: False))
    model, _ = build_model("qwen3-moe-tiny", seed=1, num_tokens=16)
    compiled = kc.compile(model, dynamic=True, strict=True, graph_mode="piecewise", capture_sizes=[4, 8])
    with torch.no_grad(), cpu_kernels(False):
        for t in (3, 4, 3, 5, 8, 9, 10, 11, 12, 13, 14, 15, 3):
            ids, pos = make_inputs(BUILTIN_CONFIGS["qwen3-moe-tiny"], t, generator=torch.Generator().manual_seed(t))
            compiled(ids, pos)
    rt = runs[0]
    sym = rt.sym
    # 3 and 4 run padded at 4, 5 and 8 at 8; 9.. are above the largest capture size: unpadded, one walk each
    assert [w[sym] for w in walks] == [4, 8, 9, 10, 11, 12, 13, 14][:piecewise.MAX_PRECOMPILED_SIZES]
    assert len(rt.precompiled) == piecewise.MAX_PRECOMPILED_SIZES
