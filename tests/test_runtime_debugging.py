"""`align` and `bisect` reach the runtime: a planted runtime fault is found and named piece by piece."""
import pytest
import torch

from kunlun_compile.config import CompileConfig
from kunlun_compile.debug.bisect import Bisector
from kunlun_compile.debug.runtime_align import align_runtime
from kunlun_compile.debug.targets import Target
from kunlun_compile.runtime.capture_sets import CaptureSets

from .test_runtime_contract import _Stack


def _target():
    torch.manual_seed(0)
    return Target("stack", _Stack(layers=2).eval(), (torch.randn(8, 32),))


@pytest.fixture
def captures_ignore_parameters(monkeypatch):
    """The planted fault: one capture per size whatever weights a call passes (the runtime bug behind
    the silently wrong decode stack)."""
    real = CaptureSets.lookup

    def first_set(self, plan, size, args):
        sets = self._sets.get((plan, size))
        return sets[0] if sets else real(self, plan, size, args)

    monkeypatch.setattr(CaptureSets, "lookup", first_set)


def test_align_checks_replays_and_passes_a_sound_runtime():
    result = align_runtime(_target(), CompileConfig(graph_mode="piecewise"))
    assert result["checked"] and result["replay_checks"] > 0
    assert result["replay_checks_failed"] == 0 and result["output_ok"]


def test_align_names_the_piece_of_a_planted_runtime_fault(captures_ignore_parameters):
    result = align_runtime(_target(), CompileConfig(graph_mode="piecewise"))
    assert not result["output_ok"]
    first = result["first_divergence"]
    assert first is not None and first["check"] == "replay vs the piece as plain code" and first["rel_err"] > 1e-3


def test_align_says_when_it_cannot_check():
    result = align_runtime(_target(), CompileConfig(graph_mode="none"))
    assert not result["checked"] and "graph mode none" in result["why"]


def test_bisect_blames_the_runtime_not_a_pass(captures_ignore_parameters):
    result = Bisector(_target(), CompileConfig(graph_mode="full")).run()
    assert result["verdict"].startswith("the runtime: graph mode none is within tolerance and full is not")
    assert result["first_bad_piece"]["piece"] >= 0 and result["first_bad_pass"] is None


def test_bisect_of_a_sound_runtime_goes_on_to_the_passes():
    result = Bisector(_target(), CompileConfig(graph_mode="piecewise")).run()
    assert result["first_bad_piece"] is None
    assert result["verdict"] == "the compiled output is within tolerance with every pass on"


def test_bench_checks_the_replayed_calls(monkeypatch):
    """`bench`'s check used to compare the first call only (a warm-up, run as plain code).  Planted
    fault: replays return scaled results."""
    import kunlun_compile as kc
    from kunlun_compile.debug.bench import bench
    from kunlun_compile.runtime.capture import CapturedPiece

    real = CapturedPiece._replay
    monkeypatch.setattr(CapturedPiece, "_replay", lambda self, entry, args: [
        o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in real(self, entry, args)])

    target = _target()
    result = bench(target, {"kunlun": lambda: torch.compile(target.module, backend=kc.backend(graph_mode="piecewise"))},
                   reps=2, profile_calls=1)
    row = result["rows"][0]
    assert row["calls_checked"] >= 4 and not row["matches_eager"] and row["rel_err"] > 1e-3


PLANTED = '''
import torch
from kunlun_compile.runtime.capture import CapturedPiece
from tests.test_runtime_contract import _Stack

_real = CapturedPiece._replay
CapturedPiece._replay = lambda self, entry, args: [o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point()
                                                   else o for o in _real(self, entry, args)]


def make():
    torch.manual_seed(0)
    return _Stack(layers=2).eval(), (torch.randn(8, 32),)
'''


def test_cli_align_and_bisect_name_the_piece(tmp_path, capsys, monkeypatch):
    """Through the CLI, on a model file that plants a runtime fault (replays return scaled results)."""
    import json

    from kunlun_compile.cli.main import main
    from kunlun_compile.runtime.capture import CapturedPiece

    monkeypatch.setattr(CapturedPiece, "_replay", CapturedPiece._replay)  # undone after the test
    path = tmp_path / "planted.py"
    path.write_text(PLANTED)
    assert main(["align", f"{path}:make", "--graph-mode", "piecewise", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    first = out["runtime"]["first_divergence"]
    assert first["check"] == "replay vs the piece as plain code" and first["piece"] == 0
    main(["bisect", f"{path}:make", "--graph-mode", "full", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"].startswith("the runtime: graph mode none is within tolerance and full is not")
    assert out["first_bad_piece"]["piece"] == 0
