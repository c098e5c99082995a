"""Seconds to the first token of a cold and a warm engine start, vLLM's default backend against kunlun.

    python tests/vllm/start_times.py VLLM_PYTHON MODEL_DIR [--trials N] [--out FILE]

Runs driver.py's `generate` one process at a time (no two engines share the cores).  Per trial and
backend: a cold start on empty caches (vLLM's cache root, inductor's cache dir, our kernel cache,
all fresh), then a warm start on the caches the cold one left.  `first_token_s` is from before
`LLM(...)` to one generated token.  A first untimed start warms the OS page cache, Python's
bytecode caches and vLLM's model-inspection cache, which every later start shares alike.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DRIVER = Path(__file__).resolve().parent / "driver.py"
BACKENDS = {"default": {"mode": 3}, "kunlun": {"mode": 3, "backend": "kunlun"}}


def start(python: str, model: str, config: dict, caches: Path, modelinfos: Path) -> dict:
    # vLLM's model inspection (a subprocess, ~15 s) is cached in VLLM_CACHE_ROOT/modelinfos; it is not
    # compiling, so every start shares one, filled by the untimed start
    (caches / "vllm").mkdir(parents=True, exist_ok=True)
    modelinfos.mkdir(exist_ok=True)
    if not (caches / "vllm" / "modelinfos").exists():
        (caches / "vllm" / "modelinfos").symlink_to(modelinfos, target_is_directory=True)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(caches / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
           "KUNLUN_COMPILE_CACHE_DIR": str(caches / "kunlun"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([python, str(DRIVER), "generate", model, json.dumps(config)], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"driver failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    got = json.loads(lines[-1][len("RESULT "):])
    return {k: got[k] for k in ("engine_s", "first_token_s", "tokens", "warnings")}


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("python")
    parser.add_argument("model")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    times = {(b, phase): [] for b in BACKENDS for phase in ("cold", "warm")}
    with tempfile.TemporaryDirectory() as tmp:
        modelinfos = Path(tmp) / "modelinfos"
        start(args.python, args.model, BACKENDS["kunlun"], Path(tmp) / "untimed", modelinfos)
        tokens = None
        for trial in range(args.trials):
            for backend, config in BACKENDS.items():
                caches = Path(tmp) / f"{backend}-{trial}"
                for phase in ("cold", "warm"):
                    got = start(args.python, args.model, config, caches, modelinfos)
                    tokens = tokens or got["tokens"]
                    assert got["tokens"] == tokens, (backend, phase, "tokens differ")
                    times[(backend, phase)].append(round(got["first_token_s"], 2))
                    print(backend, phase, trial, got["first_token_s"], got["warnings"], file=sys.stderr)
    table = {f"{b}_{phase}": {"median_s": statistics.median(v), "trials_s": v} for (b, phase), v in times.items()}
    print(json.dumps(table, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
