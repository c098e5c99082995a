"""Run one corpus architecture in one dtype through the backend and read what it did.

Build the model from its tiny config (seeded), take eager logits on a fixed (2, 7) batch of random ids,
compile with `kunlun_compile.backend(graph_mode="none")` (not strict: the user's default) and compare
(relative error, norm-wise, against the float64 of eager's output; limits in `LIMITS`).  The result is a
plain dict (JSON-ready): the error, the patterns found per family, the fallbacks, every near miss of every
pass of every graph, and the KunlunCompileWarnings.

On a machine without a GPU the kunlun:: ops run their Triton kernels only when TRITON_INTERPRET=1 was
set before triton was imported (tests/conftest.py does it; `benchmarks/hf_corpus_probe.py` too); else
their torch references run.  `row["interpreted"]` says which.
"""
from __future__ import annotations

import os
import time
import traceback
import warnings
from typing import Dict, Tuple

import torch
import transformers
import triton

import kunlun_compile
from kunlun_compile.ops import interpreter_usable
from kunlun_compile.utils import KunlunCompileWarning

from .archs import ARCHS, COMMON, MOE, Arch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LIMITS = {"fp32": 1e-4, "bf16": 3e-2}  # relative error of the compiled logits vs eager's
IDS_SHAPE, VOCAB = (2, 7), 256


def build(arch: Arch, dtype: torch.dtype) -> torch.nn.Module:
    cfg = getattr(transformers, arch.config)(**arch.config_options())
    torch.manual_seed(0)
    model = getattr(transformers, arch.model)(cfg)
    return model.to(dtype).eval()


def input_ids(seed: int = 1, shape: Tuple[int, int] = IDS_SHAPE) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def prepare(arch: Arch, dname: str, device: str = "cpu",
            ids_shape: Tuple[int, int] = IDS_SHAPE) -> Tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model, its ids and eager's logits."""
    model, ids = build(arch, TORCH_DTYPES[dname]).to(device), input_ids(arch.ids_seed, ids_shape).to(device)
    with torch.no_grad():
        want = model(ids).logits
    return model, ids, want


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-300))


def short_exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def compiled_run(model, ids, want, **options) -> dict:
    """Compile with a fresh backend (graph_mode="none" and `options`), run, and read its report."""
    torch._dynamo.reset()
    be = kunlun_compile.backend(**{"graph_mode": "none", **options})
    row: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                got = torch.compile(model, backend=be)(ids).logits
            row["rel_err"] = rel_err(got, want)
        except Exception as e:  # noqa: BLE001 - whatever the backend raises is a finding, reported
            row["error"] = short_exc(e)
            row["traceback"] = traceback.format_exc()[-4000:]
        row["seconds"] = round(time.perf_counter() - t0, 2)
    graphs = be.report.graphs
    patterns: Dict[str, int] = {}
    for g in graphs:
        for fam, n in g.patterns.items():
            patterns[fam] = patterns.get(fam, 0) + n
    row["graphs"] = len(graphs)
    row["patterns"] = patterns
    row["fallbacks"] = [f"{f.graph}/{f.stage}: {f.reason}" for g in graphs for f in g.fallbacks]
    row["eager_graphs"] = sum(1 for g in graphs if str(g.mode).startswith("eager"))
    row["near_misses"] = [nm for g in graphs for p in g.passes for nm in p.near_misses]
    row["warnings"] = [str(w.message) for w in caught if issubclass(w.category, KunlunCompileWarning)]
    torch._dynamo.reset()
    return row


def near_misses_of(row: dict, family: str) -> list:
    """The near-miss lines that name `family` ("add_rmsnorm: ...", "norm_rope_gate/hf_rope: ...")."""
    return [line for line in row.get("near_misses", ()) if line.split(":", 1)[0].split("/", 1)[0] == family]


def run(arch: Arch, dname: str, device: str = "cpu", ids_shape: Tuple[int, int] = IDS_SHAPE, **options) -> dict:
    """One (architecture, dtype): eager vs compiled, with what the backend found, missed and refused;
    `ids_shape` (batch, tokens) other than the default: (1, 1) is a decode step with static sizes."""
    row: dict = {"arch": arch.name, "dtype": dname, "device": device, "interpreted": interpreter_usable()}
    t0 = time.perf_counter()
    try:
        model, ids, want = prepare(arch, dname, device, ids_shape)
    except Exception as e:  # noqa: BLE001 - a model that will not build or run eagerly is reported as such
        row["build_error"] = short_exc(e)
        return row
    row.update(compiled_run(model, ids, want, **options))
    row["within_limit"] = "rel_err" in row and row["rel_err"] <= LIMITS[dname]
    row["total_seconds"] = round(time.perf_counter() - t0, 2)
    return row


def meta() -> dict:
    """What a run's results depend on, for the JSON that keeps them."""
    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "kunlun_compile": kunlun_compile.__version__, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
            "interpreted": interpreter_usable(), "config": {**COMMON, "moe": MOE},
            "ids": f"torch.randint(0, {VOCAB}, {IDS_SHAPE}), generator seed 1 unless the architecture's ids_seed"}


def by_name(name: str) -> Arch:
    return next(a for a in ARCHS if a.name == name)
