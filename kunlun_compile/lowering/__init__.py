"""Lowering to vector and SFU instructions (KIR) and Triton code generation: element-wise work and
row kernels (a reduction with its element-wise producers and consumers).

    cluster.py      connected element-wise ATen nodes and reductions -> clusters (networkx, no cycles)
    isel.py         ATen element-wise ops -> KIR instructions under the accuracy policy
    cluster_isel.py a cluster -> one KernelIR (loads, nodes in order, stores); indexing ones via reindex.py
    isel_reduce.py  ATen reductions (sum, mean, amax, var, softmax, layer norm...) -> KIR
    kir.py          the IR: instructions tagged vec / sfu / mem, listing, (de)serialisation
    targets.py      per-device unit descriptions and cost estimates (cuda, kunlun-xpu)
    codegen.py      KIR -> Triton source (inline PTX SFU instructions on CUDA; interpretable flavour)
    row_codegen.py  row-kernel KIR -> Triton source (persistent and looped forms)
    row_kernel.py   row-kernel launcher (tile sizes, strides)
    cache.py        registry, disk cache, launcher
    interpret.py    KIR interpreter in torch (the reference)
The pass that drives them is passes/lower_elementwise.py; the op is kunlun::pointwise.
"""
from __future__ import annotations

from typing import List, Sequence

from .cache import kir_for, source_path
from .codegen import generate
from .row_codegen import generate_row
from .targets import TARGETS, Target, get_target


def describe_kernels(keys: Sequence[str], target: Target, with_source: bool = False) -> List[dict]:
    """One dict per generated kernel call: what it came from, its instruction counts and listing."""
    out = []
    for key in keys:
        kir = kir_for(key)
        d = {"key": key, "origin": kir.origin, "rank": kir.rank, "vector_ops": kir.count("vec"),
             "sfu_ops": kir.count("sfu"), "memory_ops": kir.count("mem"),
             "cycles_per_element": round(target.cycles_per_element(kir), 5), "target": target.name,
             "listing": kir.listing(target), "source_path": str(source_path(key))}
        if with_source:
            d["source"] = generate(kir) if kir.reduce_dim is None else generate_row(kir)
        out.append(d)
    return out


__all__ = ["TARGETS", "Target", "describe_kernels", "get_target"]
