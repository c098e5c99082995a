"""The real CLI, in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap

EXPLAIN_KEYS = {"target", "ok", "max_abs_err", "rel_err", "graphs", "patterns", "kernels", "sfu_ops", "vector_ops",
                "pieces", "fallbacks"}
FAMILIES = {"norm_rope_gate", "add_rmsnorm", "moe_gate", "moe_ffn", "masked_input", "attention_mask",
            "decode_linear"}


def cli(*args, timeout=600):
    # the CLI as a user on a CPU machine runs it: kunlun:: ops on their torch references (their Triton
    # kernels are tested under the interpreter in the op tests; interpreting them here only costs CI time)
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "kunlun_compile", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _check_explain_json(out: dict, target: str):
    assert EXPLAIN_KEYS <= set(out), EXPLAIN_KEYS - set(out)
    assert out["target"] == target and out["ok"] is True
    assert set(out["patterns"]) == FAMILIES
    assert set(out["kernels"]) == {"fused", "pointwise", "aten"}
    assert out["graphs"] >= 1 and out["pieces"] >= 1
    assert sum(out["kernels"].values()) > 0
    assert out["fallbacks"] == []
    assert 0 <= out["rel_err"] <= 1e-4 and out["max_abs_err"] >= 0


def test_explain_json_builtin():
    r = cli("explain", "qwen3-moe-tiny", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    _check_explain_json(out, "qwen3-moe-tiny")
    # the MoE execution path at each capture size (2 layers: 2 fused_moe calls, 8 experts, top-2)
    assert len(out["moe_paths"]) == 2 and out["moe_paths"][0]["activation"] == "silu"
    plans = out["moe_paths"][0]["plans"]
    assert "routing per-pair" in plans["1"] and "routing scan" in plans["32"] and "large path" in plans["512"]


def test_explain_json_factory_file(tmp_path):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch
        def make():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
            return m.eval(), (torch.randn(4, 8),)
    """))
    r = cli("explain", f"{src}:make", "--json", "--disable", "dead_code")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    _check_explain_json(out, f"{src}:make")
    passes = {p["name"]: p for p in out["graph_reports"][0]["passes"]}
    assert passes["dead_code"]["skipped"] == "disabled"


def test_explain_text_and_bad_target():
    r = cli("explain", "llama-tiny")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "remove_noop_ops" in r.stdout and "check vs eager: OK" in r.stdout
    r = cli("explain", "no-such-model")
    assert r.returncode != 0 and "unknown target" in r.stderr


def test_demo():
    r = cli("demo")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qwen3-next-tiny" in r.stdout and "kernels before" in r.stdout and "check vs eager: OK" in r.stdout
    for name in ["llama-tiny", "qwen3-tiny", "qwen3-moe-tiny", "deepseek-v3-tiny"]:
        assert name in r.stdout


def test_no_fusion_flag_turns_the_fusion_passes_off():
    rows = json.loads(cli("passes", "--json", "--no-fusion").stdout)
    enabled = {row["name"]: row["enabled"] for row in rows}
    assert not any(enabled[f] for f in FAMILIES) and enabled["lower_elementwise"] and enabled["dead_code"]
    r = cli("explain", "qwen3-tiny", "--json", "--no-fusion")
    passes = {p["name"]: p for p in json.loads(r.stdout)["graph_reports"][0]["passes"]}
    assert all(passes[f]["skipped"] == "fusion off" for f in FAMILIES)


def test_passes_listing():
    r = cli("passes", "--json", "--disable", "dead_code")
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["remove_noop_ops", "masked_input", "attention_mask", "norm_rope_gate",
                                             "moe_gate", "moe_ffn", "add_rmsnorm", "decode_linear", "restore_algebra",
                                             "group_linears", "dead_code", "lower_elementwise",
                                             "views_after_fused_ops"]
    assert {row["name"]: row["enabled"] for row in rows}["dead_code"] is False
    assert all(row["description"] for row in rows)
    patterns = {row["name"]: row["patterns"] for row in rows}
    assert patterns["dead_code"] == [] and patterns["lower_elementwise"] == [] and patterns["group_linears"] == []
    assert patterns["restore_algebra"] == []
    for family in FAMILIES:  # every fusion pass lists its rules: what each matches, what it needs, its guard
        assert patterns[family], family
        assert all(rule["rule"] and rule["matches"] for rule in patterns[family])
    assert "positive_eps" in {c for rule in patterns["add_rmsnorm"] for c in rule["checks"]}
    assert any("aten.topk.default" in rule["needs"] for rule in patterns["moe_gate"])


def test_console_script_installed():
    import shutil
    exe = shutil.which("kunlun-compile")
    assert exe, "kunlun-compile console script not on PATH (pip install -e . missing?)"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "explain" in r.stdout
