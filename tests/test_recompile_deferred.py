"""Graph code is regenerated once per pass, not after every edit (`utils.recompile_deferred`): a pass's edits
must still reach the code that runs, and callers outside the pass manager must get current code at once."""
import torch
import torch.fx as fx

from kunlun_compile.passes.canonical import canonicalize
from kunlun_compile.utils import copy_graph_module, recompile, recompile_deferred


class Scaled(torch.nn.Module):
    def forward(self, x):
        return torch.ops.aten._unsafe_view.default(x * 2, [-1])


def _traced():
    return fx.symbolic_trace(Scaled())


def test_recompile_outside_a_pass_regenerates_the_code_at_once():
    gm = _traced()
    canonicalize(gm)  # _unsafe_view -> view, recompiled here: nobody recompiles later
    assert "aten._unsafe_view" not in gm.code and "aten.view" in gm.code


def test_inside_a_pass_the_code_waits_for_the_managers_recompile():
    gm = _traced()
    with recompile_deferred():
        canonicalize(gm)
        assert "aten._unsafe_view" in gm.code  # the graph is edited, the code not yet regenerated
    recompile(gm)
    assert "aten._unsafe_view" not in gm.code


def test_a_compiled_model_runs_every_pass_edit():
    """Through the backend (passes inside the manager): the graph that runs is the edited one."""
    import kunlun_compile as kc

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.SiLU())
    x = torch.randn(4, 16)
    compiled = kc.compile(model, graph_mode="none")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    code = compiled.kunlun_backend.report.graphs[0].passes[-1].code_after
    assert "kunlun" in code  # the lowering's kernel call is in the code that ran


def test_a_copy_runs_like_its_original():
    gm = _traced()
    x = torch.randn(3, 2)
    copy = copy_graph_module(gm)
    torch.testing.assert_close(copy(x), gm(x))
    assert copy.graph is not gm.graph and "mul" in copy.code
