import dataclasses

import pytest
import torch

import kunlun_compile as kc
from kunlun_compile.config import CompileConfig


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        kc.backend(strikt=True)
    msg = str(e.value)
    assert "strikt" in msg
    for name in CompileConfig.option_names():
        assert name in msg


def test_unknown_option_through_torch_compile_options():
    m = torch.nn.Linear(4, 4).eval()
    compiled = torch.compile(m, backend="kunlun", options={"no_such_option": 1})
    with torch.no_grad(), pytest.raises(Exception, match="valid options are"):
        compiled(torch.randn(2, 4))


def test_options_reach_config_through_torch_compile():
    m = torch.nn.Linear(4, 4).eval()
    compiled = torch.compile(m, backend="kunlun", options={"disable": ["dead_code"], "strict": True})
    x = torch.randn(3, 4)
    with torch.no_grad():
        # the Linear runs as kunlun::linear (a GEMV at 3 rows x 4 outputs): same math, its own sum order
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-6, atol=1e-6)
    report = kc.last_report()
    records = {p.name: p for p in report.graphs[-1].passes}
    assert records["dead_code"].skipped == "disabled"
    assert records["remove_noop_ops"].skipped is None


def test_env_disable_merges_with_options():
    cfg = CompileConfig.from_options({"disable": ["a"]}, environ={"KUNLUN_COMPILE_DISABLE": "b, c"})
    assert cfg.disable == ("a", "b", "c")
    assert not cfg.is_enabled("b") and cfg.is_enabled("d")


def test_env_disable_reaches_backend(monkeypatch):
    monkeypatch.setenv("KUNLUN_COMPILE_DISABLE", "remove_noop_ops")
    be = kc.backend(strict=True)
    assert not be.config.is_enabled("remove_noop_ops")


def test_env_strict():
    assert CompileConfig.from_options({}, environ={"KUNLUN_COMPILE_STRICT": "1"}).strict
    assert not CompileConfig.from_options({}, environ={"KUNLUN_COMPILE_STRICT": "0"}).strict
    # an explicit option wins over the environment
    assert not CompileConfig.from_options({"strict": False}, environ={"KUNLUN_COMPILE_STRICT": "1"}).strict


def test_disabling_an_unknown_pass_is_an_error():
    with pytest.raises(ValueError, match="passes are"):
        kc.backend(disable=["no_such_pass"])


def test_option_types_are_checked():
    with pytest.raises(TypeError):
        kc.backend(strict="yes")
    with pytest.raises(TypeError):
        kc.backend(disable=[1, 2])


def test_config_is_frozen():
    cfg = CompileConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.strict = True


def test_mode_argument_is_rejected_clearly():
    m = torch.nn.Linear(4, 4).eval()
    compiled = torch.compile(m, backend="kunlun", mode="max-autotune")
    with torch.no_grad(), pytest.raises(Exception, match="not supported"):
        compiled(torch.randn(2, 4))


def test_no_fusion_turns_every_fusion_pass_off_and_keeps_the_numbers():
    """`fusion=False` (CLI `--no-fusion`): the generic path alone -- every fusion family skipped, the rest run."""
    from kunlun_compile.models import build_model

    model, inputs = build_model("qwen3-moe-tiny", dtype=torch.float32, device="cpu", num_tokens=8, seed=0)
    compiled = kc.compile(model, strict=True, fusion=False)
    with torch.no_grad():
        got, want = compiled(*inputs), model(*inputs)
    (graph,) = compiled.kunlun_backend.report.graphs
    records = {p.name: p for p in graph.passes}
    families = [name for name, r in records.items() if name in graph.patterns]
    assert families and all(records[f].skipped == "fusion off" for f in families)
    assert not any(graph.patterns.values())
    assert records["lower_elementwise"].skipped is None and records["lower_elementwise"].matches > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="fusion"):
        kc.backend(fusion="no")
