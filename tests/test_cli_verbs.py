"""The debugging verbs of the real CLI, in a subprocess: record/replay, explain --pass, bisect,
align, graph, bench.  `planted_models.py` has a small model and a deliberately broken rewrite
(the residual RMSNorm rule scales its output on the norm whose eps is 1e-5, the second of three)."""
import json
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from .test_cli import cli

HERE = os.path.dirname(__file__)
PLANTED = os.path.join(HERE, "planted_models.py")
SVG = "{http://www.w3.org/2000/svg}"


def run_json(*args):
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


class _Tags(HTMLParser):
    """Every start tag with its attributes (and a parse of the whole page: malformed HTML raises)."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse_html(path):
    p = _Tags()
    with open(path) as f:
        text = f.read()
    p.feed(text)
    p.close()
    assert text.lstrip().startswith("<!DOCTYPE html>")
    return text, p.tags


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    result = run_json("record", "qwen3-tiny", str(out))
    assert result["recorded"] == [str(out / "graph_0")] and result["ok"]
    return result


def test_record_writes_a_loadable_graph(recorded):
    recorded = recorded["recorded"][0]
    assert sorted(os.listdir(recorded)) == ["graph.json", "graph.py", "inputs.json"]
    meta = json.load(open(os.path.join(recorded, "inputs.json")))
    ids = meta["inputs"][1] if meta["inputs"][0]["kind"] == "int" else meta["inputs"][0]
    assert ids["dtype"] == "int64" and ids["stats"]["max"] < 512  # token ids: the range the stand-ins keep to
    params = [i for i in meta["inputs"] if i.get("parameter")]
    assert params and all("mean" in p["stats"] and p["stride"] for p in params)
    assert "torch.ops.aten" in open(os.path.join(recorded, "graph.py")).read()


def test_explain_a_recorded_graph_fuses_as_the_live_model(recorded):
    live, path = recorded, recorded["recorded"][0]
    replay = run_json("explain", path)
    assert replay["ok"] and replay["target"] == path
    assert replay["patterns"] == live["patterns"] and replay["kernels"] == live["kernels"]


def test_explain_one_pass():
    out = run_json("explain", "llama-tiny", "--pass", "add_rmsnorm")
    (detail,) = out["pass_detail"]
    assert detail["pass"] == "add_rmsnorm" and detail["matches"] == detail["patterns"]["add_rmsnorm"] > 0
    added = [line for line in detail["diff"] if line.startswith("+")]
    removed = [line for line in detail["diff"] if line.startswith("-")]
    assert any("kunlun.fused_add_rmsnorm" in line for line in added)
    # the prologue's pass made every norm a primitive already (its Q/K norms are its rules' inputs)
    assert any("kunlun.rmsnorm_primitive" in line for line in removed)
    r = cli("explain", "llama-tiny", "--pass", "no_such_pass")
    assert r.returncode != 0 and "no pass named" in r.stderr


def test_bisect_finds_the_planted_rewrite():
    out = run_json("bisect", f"{PLANTED}:two_norms_broken")
    assert out["first_bad_pass"] == "add_rmsnorm", out["verdict"]
    bad = out["first_bad_rewrite"]
    assert (bad["index"], bad["of"]) == (2, 3), out["verdict"]  # the second of the three norms
    assert "add_rmsnorm/add_rmsnorm" in bad["description"] and bad["rel_err"] > bad["tolerance"]
    marked = [line for line in bad["context"].splitlines() if line.startswith(">>")]
    assert any("1e-05" in line for line in marked) and len(marked) == len(bad["nodes"])
    assert [p["ok"] for p in out["probes"]][:2] == [False, True]  # all passes: broken; none: fine


def test_bisect_on_a_correct_compile_finds_nothing():
    out = run_json("bisect", f"{PLANTED}:two_norms")
    assert out["first_bad_pass"] is None and "within tolerance" in out["verdict"]


def test_align_reports_everything_aligned_on_a_correct_compile(tmp_path, recorded):
    for target in (f"{PLANTED}:two_norms", "qwen3-moe-tiny", recorded["recorded"][0]):
        out = run_json("align", target)
        assert out["nodes_compared"] > 10 and out["aligned_share"] == 1.0 and out["first_divergence"] is None, target


def test_align_names_the_planted_broken_node(tmp_path):
    page = tmp_path / "align.html"
    out = run_json("align", f"{PLANTED}:two_norms_broken", "--html", str(page))
    first = out["first_divergence"]
    assert first["replaces"] == "mul_3"  # the output of the eps=1e-5 norm, which the broken rewrite replaced
    assert 0 < out["aligned_share"] < 1 and first["rel_err"] > 0.1
    assert out["worst"][0]["ok"] is False
    text, tags = parse_html(page)
    rows = [a for t, a in tags if t == "tr" and "class" in a]
    assert len(rows) == out["nodes_compared"]
    assert [a["class"] for a in rows].count("first") == 1 and "mul_3" in text


def test_graph_draws_pieces_and_fusion_groups(tmp_path, recorded):
    page = tmp_path / "graph.html"
    out = run_json("graph", "qwen3-next-tiny", "-o", str(page))
    (g,) = out["graphs"]
    assert g["pieces"] == 5  # captured, attention, captured, attention, captured (2 layers)
    assert g["kinds"]["split"] == 2 and g["kinds"]["fused"] > 0 and g["kinds"]["generated"] > 0
    text, tags = parse_html(page)
    svg = ET.fromstring(re.search(r"<svg.*?</svg>", text, re.S).group(0))
    groups = svg.findall(f".//{SVG}g")
    pieces = [e for e in groups if e.get("class") == "piece"]
    nodes = [e for e in groups if (e.get("class") or "").startswith("node ")]
    assert len(pieces) == g["pieces"] and len(nodes) == g["nodes"]
    assert {n.get("class") for n in nodes} == {f"node {k}" for k, v in g["kinds"].items() if v}
    assert svg.findall(f".//{SVG}line")  # the edges
    out = run_json("graph", recorded["recorded"][0], "-o", str(tmp_path / "recorded.html"))
    assert out["graphs"][0]["kinds"]["fused"] > 0


def test_bench_splits_time_per_variant():
    out = run_json("bench", f"{PLANTED}:two_norms", "--reps", "3")
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == {"eager", "inductor", "kunlun"}
    for name in ("eager", "kunlun"):  # inductor needs a C++ compiler on the CPU: reported if missing
        r = rows[name]
        assert r["ms_per_call"] > 0 and r["matches_eager"], r
        assert set(r["us"]) == {"fused", "generated", "aten", "host"}
    assert rows["eager"]["launches"]["fused"] == 0 and rows["eager"]["launches"]["aten"] > 0
    # the three residual RMSNorms and the three linears (6 rows x 32 outputs: the GEMV)
    assert rows["kunlun"]["launches"]["fused"] == 6
    assert rows["kunlun"]["launches"]["generated"] > 0
    assert "error" in rows["inductor"] or rows["inductor"]["matches_eager"]


def test_explain_prints_near_misses_and_every_diff():
    r = cli("explain", f"{PLANTED}:escaping_norm", "--diff")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pass add_rmsnorm: " in r.stdout and "pass lower_elementwise: " in r.stdout  # every pass, in order
    r = cli("explain", f"{PLANTED}:escaping_norm")
    assert "near miss (add_rmsnorm): add_rmsnorm/rmsnorm_vllm: an intermediate value (mean, aten.mean.dim) is used " \
           "outside the pattern" in r.stdout
