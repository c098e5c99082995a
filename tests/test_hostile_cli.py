"""The CLI and the options on hostile input: every mistake a person or a script can make ends as one
clear line (no traceback unless --verbose), or under --json as one object {"ok": false, "error": ...},
with a non-zero exit status.  Most cases run `main()` in this process (fast); one runs the real
command to check what a shell sees."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import kunlun_compile.cli.main as cli_main
from kunlun_compile.capture.recompiles import parse_limit_warning
from kunlun_compile.config import CompileConfig
from kunlun_compile.ops import cpu_kernels

FACTORIES = textwrap.dedent("""
    import torch

    def good():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 16).eval(), (torch.randn(3, 8),)

    def as_list():  # inputs as a list: the module's positional arguments
        torch.manual_seed(0)
        return torch.nn.Linear(8, 16).eval(), [torch.randn(3, 8)]

    def sized(tokens=3):
        torch.manual_seed(0)
        return torch.nn.Linear(8, 16).eval(), (torch.randn(tokens, 8),)

    def returns_none():
        torch.nn.Linear(8, 16)

    def bare_module():
        return torch.nn.Linear(8, 16)

    def swapped():
        return (torch.randn(3, 8),), torch.nn.Linear(8, 16)

    def three_items():
        return torch.nn.Linear(8, 16), (torch.randn(3, 8),), "extra"

    def dict_inputs():
        return torch.nn.Linear(8, 16), {"x": torch.randn(3, 8)}

    def wrong_width():
        return torch.nn.Linear(8, 16), (torch.randn(3, 5),)

    def raises():
        raise RuntimeError("weights not found")

    def _step(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    class RankChanger(torch.nn.Module):
        '''Calls _step on tensors of rank 1..10: a new compile of _step per rank, the 9th over the limit.'''

        def forward(self, x):
            for rank in range(1, 11):
                x = x + _step(x.reshape([1] * (rank - 1) + [-1])).reshape(-1)
            return x

    def rank_changer():
        return RankChanger(), (torch.randn(8),)
""")


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "models.py"
    path.write_text(FACTORIES)
    return str(path)


@pytest.fixture
def run(capsys):
    """main(argv) in this process, as on a CPU machine (kunlun:: ops on their torch references):
    (exit status, stdout, stderr)."""
    def call(*argv):
        with cpu_kernels(False):
            code = cli_main.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return call


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def json_error(code, out, *words):
    assert code == 2
    obj = json.loads(out)  # exactly one JSON document on stdout
    assert obj["ok"] is False and isinstance(obj["error"], str)
    for w in words:
        assert w in obj["error"], (w, obj["error"])
    return obj


# ---- --tokens, --reps, --device --------------------------------------------------------------------

@pytest.mark.parametrize("tokens,words", [("0", ["--tokens", ">= 1"]), ("-1", ["--tokens", ">= 1"]),
                                          ("100000", ["llama-tiny", "1 to 1024 tokens"])])
def test_token_counts_out_of_range(run, tokens, words):
    assert_one_line_error(*run("explain", "llama-tiny", "--tokens", tokens)[::2], *words)
    obj = json_error(*run("explain", "llama-tiny", "--tokens", tokens, "--json")[:2], *words)
    assert obj["verb"] == "explain"


def test_bench_reps_zero(run):
    assert_one_line_error(*run("bench", "llama-tiny", "--reps", "0")[::2], "--reps")
    json_error(*run("bench", "llama-tiny", "--reps", "0", "--json")[:2], "--reps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_bench_on_cuda_without_a_gpu(run):
    assert_one_line_error(*run("bench", "llama-tiny", "--device", "cuda")[::2], "--device cuda", "no CUDA GPU")
    json_error(*run("bench", "llama-tiny", "--device", "cuda", "--json")[:2], "no CUDA GPU")


def test_usage_errors_are_json_under_json(run):
    json_error(*run("explain", "llama-tiny", "--dtype", "fp8", "--json")[:2], "--dtype")
    json_error(*run("explain", "--json")[:2], "target")


# ---- factories ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,words", [
    ("returns_none", ["returned None", "return (module, example_inputs)"]),
    ("bare_module", ["bare module (Linear)", "return (module, example_inputs)"]),
    ("swapped", ["where the module goes"]),
    ("three_items", ["a tuple of 3 item(s)"]),
    ("dict_inputs", ["a dict as example_inputs"]),
    ("wrong_width", ["fails eagerly on its example inputs", "RuntimeError"]),
    ("raises", ["raised RuntimeError: weights not found"]),
    ("no_such_function", ["has no function 'no_such_function'"]),
])
def test_factories_returning_the_wrong_thing(run, factories, factory, words):
    assert_one_line_error(*run("explain", f"{factories}:{factory}")[::2], *words)
    json_error(*run("explain", f"{factories}:{factory}", "--json")[:2], *words)


def test_a_factory_file_that_does_not_import(run, tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("def make(:\n")
    assert_one_line_error(*run("explain", f"{bad}:make")[::2], "cannot import", "SyntaxError")


def test_inputs_given_as_a_list_are_the_positional_arguments(run, factories):
    code, out, err = run("explain", f"{factories}:as_list", "--json")
    assert code == 0, err
    assert json.loads(out)["graph_reports"][0]["inputs"][-1] == "f32[3, 8]"


def test_dtype_and_tokens_reach_a_factory(run, factories):
    code, out, err = run("explain", f"{factories}:sized", "--dtype", "bf16", "--tokens", "5", "--json")
    assert code == 0, err
    result = json.loads(out)
    # the Linear's weight and bias cast, the input cast and made with 5 rows
    assert result["graph_reports"][0]["inputs"] == ["bf16[16, 8]", "bf16[16]", "bf16[5, 8]"] and result["ok"]


def test_tokens_for_a_factory_that_cannot_take_them(run, factories):
    assert_one_line_error(*run("explain", f"{factories}:good", "--tokens", "4")[::2],
                          "--tokens 4", "no `tokens` parameter")


# ---- recorded graphs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(factories, tmp_path_factory):
    out = tmp_path_factory.mktemp("recorded")
    torch._dynamo.reset()
    with cpu_kernels(False):
        assert cli_main.main(["record", f"{factories}:good", str(out), "--json"]) == 0
    torch._dynamo.reset()
    return out / "graph_0"


@pytest.mark.parametrize("damage", [("graph.json", '{"nodes": ['), ("inputs.json", "[]"),
                                    ("inputs.json", '{"inputs": [{"kind": "tensor"}]}')])
def test_a_damaged_recording_is_reported_not_raised(run, recorded, tmp_path, damage):
    copy = tmp_path / "graph_0"
    shutil.copytree(recorded, copy)
    (copy / damage[0]).write_text(damage[1])
    assert_one_line_error(*run("explain", copy)[::2], "cannot load the recorded graph", str(copy))
    json_error(*run("explain", copy, "--json")[:2], "cannot load the recorded graph")


def test_dtype_or_tokens_for_a_recording(run, recorded):
    assert_one_line_error(*run("explain", recorded, "--tokens", "4")[::2], "recorded graph", "--tokens")


# ---- output paths -----------------------------------------------------------------------------------

def test_unwritable_outputs_fail_before_compiling(run, tmp_path, monkeypatch):
    def no_compiling(*a, **k):
        raise AssertionError("compiled before checking the output path")
    monkeypatch.setattr(cli_main, "resolve_target", no_compiling)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert_one_line_error(*run("graph", "llama-tiny", "-o", tmp_path / "missing" / "g.html")[::2],
                          "-o/--output", "cannot write there")
    assert_one_line_error(*run("align", "llama-tiny", "--html", tmp_path)[::2], "--html", "is a directory")
    assert_one_line_error(*run("record", "llama-tiny", a_file / "graphs")[::2], "OUT_DIR", "cannot write there")
    json_error(*run("graph", "llama-tiny", "-o", a_file / "g.html", "--json")[:2], "cannot write there")


# ---- option values ----------------------------------------------------------------------------------

def test_misspelt_splitting_op_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        CompileConfig.from_options({"splitting_ops": ["vllm::unified_atention"]})
    message = str(e.value)
    assert "did you mean 'vllm::unified_attention'" in message and "aten::nonzero" in message
    with pytest.raises(ValueError, match="namespace::op"):
        CompileConfig.from_options({"splitting_ops": "unified_attention"})
    # the runtime's own splitting ops, and any op registered with torch
    ok = CompileConfig.from_options({"splitting_ops": ["kunlun_models::attention", "aten::repeat_interleave.Tensor",
                                                       "kunlun::rms_norm", "aten::mm.default"]})
    assert len(ok.splitting_ops) == 4


@pytest.mark.parametrize("value,strict", [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                          ("0", False), ("false", False), ("no", False), ("OFF", False),
                                          (" No ", False), ("", False)])
def test_strict_variable_spellings(value, strict):
    assert CompileConfig.from_options({}, environ={"KUNLUN_COMPILE_STRICT": value}).strict is strict


@pytest.mark.parametrize("value", ["2", "nah", "tru", "enabled"])
def test_strict_variable_rejects_anything_else(value, run, monkeypatch):
    with pytest.raises(ValueError, match="KUNLUN_COMPILE_STRICT"):
        CompileConfig.from_options({}, environ={"KUNLUN_COMPILE_STRICT": value})
    monkeypatch.setenv("KUNLUN_COMPILE_STRICT", value)
    assert_one_line_error(*run("passes")[::2], "KUNLUN_COMPILE_STRICT", "not an on/off value")


# ---- JSON on every path, tracebacks only when asked ---------------------------------------------------

def test_demo_json(run, monkeypatch):
    monkeypatch.setattr(cli_main, "builtin_names", lambda: ("llama-tiny",))  # one model: keep it short
    code, out, err = run("demo", "--model", "llama-tiny", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and result["model"] == "llama-tiny" and result["result"]["kernels"]["fused"] > 0
    assert [m["model"] for m in result["models"]] == ["llama-tiny"]


def test_an_unexpected_failure_is_one_line_unless_verbose(run, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("the compiler broke\nsecond line of detail")
    monkeypatch.setattr(cli_main, "explain_target", broken)
    code, _, err = run("explain", "llama-tiny")
    assert_one_line_error(code, err, "RuntimeError: the compiler broke", "--verbose")
    code, _, err = run("explain", "llama-tiny", "--verbose")
    assert code == 2 and "Traceback" in err and "the compiler broke" in err
    obj = json_error(*run("explain", "llama-tiny", "--json")[:2], "the compiler broke")
    assert obj["error_type"] == "RuntimeError" and obj["target"] == "llama-tiny"


def test_the_real_command_exits_non_zero_without_a_traceback():
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "kunlun_compile", "explain", "llama-tiny", "--tokens", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: argument --tokens: must be >= 1, got 0  "
                                             "(see kunlun-compile explain --help)"]


# ---- Dynamo's recompile limit ---------------------------------------------------------------------

def test_recompile_limit_is_reported(run, factories):
    code, out, err = run("explain", f"{factories}:rank_changer", "--json")
    assert code == 0, err
    hits = json.loads(out)["recompile_limit_hits"]
    assert len(hits) == 1 and hits[0]["limit"] == "recompile_limit" and "'_step'" in hits[0]["function"]
    code, out, _ = run("explain", f"{factories}:rank_changer")
    assert "note: Dynamo hit torch._dynamo.config.recompile_limit (8) compiling '_step'" in out


def test_recompile_limit_warning_parsing():
    text = ("torch._dynamo hit config.recompile_limit (8)\n   function: 'forward' (m.py:3)\n"
            "   last reason: 0/7: tensor 'x' size mismatch at index 0. expected 7, actual 8\n"
            'To log all recompilation reasons, use TORCH_LOGS="recompiles".')
    assert parse_limit_warning(text) == {"limit": "recompile_limit", "value": "8", "function": "'forward' (m.py:3)",
                                         "last_reason": "0/7: tensor 'x' size mismatch at index 0. expected 7, "
                                                        "actual 8"}
    assert parse_limit_warning("torch._dynamo something else") is None


def test_recompile_limit_is_a_note_in_the_library_report():
    """Past Dynamo's recompile limit the backend is never called again for that function; the report
    of the backend says so instead of staying silent."""
    import torch
    import kunlun_compile as kc

    torch._dynamo.reset()
    compiled = kc.compile(lambda x: torch.relu(x) * 2, dynamic=False)
    old = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 2
    try:
        with torch.no_grad():
            for n in range(1, 5):
                compiled(torch.randn(n, 3))
    finally:
        torch._dynamo.config.recompile_limit = old
    notes = compiled.kunlun_backend.report.notes
    assert notes and "recompile_limit" in notes[0] and "not compiled by this backend" in notes[0]
    assert "note: Dynamo hit" in str(compiled.kunlun_backend.report)
