"""One compile serves every batch size; symbolic sizes stay symbolic."""
import torch

import kunlun_compile as kc
from kunlun_compile.models import BUILTIN_CONFIGS, build_model, make_inputs


def test_one_compile_serves_sizes_across_the_plan_boundaries():
    model, _ = build_model("qwen3-moe-tiny")
    compiled = kc.compile(model, dynamic=True, strict=True)
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # 1: GEMVs everywhere; 2-16: GEMVs on narrow outputs only (rows per program 2, 4, 8, 16);
        # 17: cuBLAS for every linear
        for t in [5, 1, 2, 3, 4, 8, 9, 16, 17]:
            ids, pos = make_inputs(BUILTIN_CONFIGS["qwen3-moe-tiny"], t, generator=gen)
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)
    report = compiled.kunlun_backend.report
    assert len(report.graphs) == 1, [g.inputs for g in report.graphs]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1
    # the token dimension is a symbol, not a number
    assert any("s" in spec and "[" in spec for spec in report.graphs[0].inputs[:2])


def test_mark_dynamic_compiles_once_for_sizes_2_and_up():
    model, _ = build_model("llama-tiny")
    be = kc.backend(strict=True)
    compiled = torch.compile(model, backend=be)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in range(2, 12):
            ids, pos = make_inputs(BUILTIN_CONFIGS["llama-tiny"], t, generator=gen)
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(pos, 0)
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)
    assert len(be.report.graphs) == 1


def test_scalar_constants_stay_constants_under_dynamic():
    """eps must reach the passes as a number (fusion guards read it), not as a runtime input."""
    model, inputs = build_model("llama-tiny")
    compiled = kc.compile(model, dynamic=True, strict=True)
    with torch.no_grad():
        compiled(*inputs)
    g = compiled.kunlun_backend.report.graphs[0]
    assert not any(spec.startswith("f64[]") for spec in g.inputs), g.inputs
    assert "1e-06" in g.passes[-1].code_after or "9.99999" in g.passes[-1].code_after


def test_serving_shapes_context_for_plain_torch_compile():
    model, _ = build_model("qwen3-tiny")
    be = kc.backend(strict=True)
    compiled = torch.compile(model, backend=be, dynamic=True)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad(), kc.serving_shapes():
        for t in [3, 1, 9]:
            ids, pos = make_inputs(BUILTIN_CONFIGS["qwen3-tiny"], t, generator=gen)
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)
    assert len(be.report.graphs) == 1


class BroadcastAfterBreak(torch.nn.Module):
    """A graph break hands the rest of the forward to a frame whose inputs include a size-1 (broadcast)
    dim: traced size-obliviously, that 1 is a symbol Dynamo cannot broadcast."""

    def forward(self, x, scale):
        h = torch.relu(x) + 1
        torch._dynamo.graph_break()
        return h * scale


def test_a_frame_dynamo_cannot_trace_under_serving_shapes_runs_eagerly_with_one_warning():
    import warnings

    from kunlun_compile.utils import KunlunCompileWarning

    model = BroadcastAfterBreak()
    compiled = kc.compile(model, dynamic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in (4, 3, 6):
            x, scale = torch.randn(b, 5, 8), torch.randn(b, 1, 8)
            torch.testing.assert_close(compiled(x, scale), model(x, scale), rtol=0, atol=0)
    mine = [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)]
    assert len(mine) == 1 and "runs it eagerly" in mine[0] and "hint = 1" in mine[0], mine


def test_strict_keeps_dynamos_error():
    import pytest

    compiled = kc.compile(BroadcastAfterBreak(), dynamic=True, strict=True)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match="fake tensor"):
        compiled(torch.randn(4, 5, 8), torch.randn(4, 1, 8))


def test_each_compiled_model_warns_for_its_own_untraceable_frame():
    """Dynamo's reason text can repeat across models (the same op, the same symbols): a second model
    that hits it still gets its warning."""
    import warnings

    from kunlun_compile.utils import KunlunCompileWarning

    for _ in range(2):
        torch._dynamo.reset()
        model = BroadcastAfterBreak()
        compiled = kc.compile(model, dynamic=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, scale = torch.randn(4, 5, 8), torch.randn(4, 1, 8)
            torch.testing.assert_close(compiled(x, scale), model(x, scale), rtol=0, atol=0)
        mine = [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)]
        assert len(mine) == 1 and "runs it eagerly" in mine[0], mine
