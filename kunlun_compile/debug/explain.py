"""What `kunlun-compile explain` adds to the compile report: per-pass graph diffs, the fused_moe
execution path at each capture size, the kernel each kunlun::linear runs at each size, and the
patterns of every pass with their guards."""
from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Dict, List, Sequence

import torch
import torch.fx as fx

from ..ops.gated_linear import plan_gated_linear
from ..ops.linear import describe_linear_group
from ..ops.moe_plan import plan_fused_moe
from ..passes.fusion import FAMILY_RULES
from ..report import GraphReport

SHOWN_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def pass_diff(code_before: str, code_after: str) -> List[str]:
    """A unified diff of one pass's graph code (without line-number noise)."""
    return list(difflib.unified_diff(code_before.splitlines(), code_after.splitlines(), "before", "after",
                                     lineterm="", n=1))


def pass_detail(report: GraphReport, name: str) -> Dict[str, Any]:
    for p in report.passes:
        if p.name == name:
            return {"graph": report.name, "pass": name, "nodes_before": p.nodes_before,
                    "nodes_after": p.nodes_after, "matches": p.matches, "patterns": dict(p.patterns),
                    "near_misses": list(p.near_misses), "skipped": p.skipped,
                    "diff": pass_diff(p.code_before, p.code_after) if p.code_before and p.code_after else []}
    raise KeyError(name)


def moe_paths(gm: fx.GraphModule, capture_sizes: Sequence[int]) -> List[Dict[str, Any]]:
    """For each kunlun::fused_moe call: experts, top-k, and the plan at each shown capture size."""
    out = []
    sizes = [s for s in SHOWN_SIZES if s in set(capture_sizes)] or list(capture_sizes)[:8]
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("kunlun.fused_moe"):
            w13, ids = n.args[1].meta["val"], n.args[4].meta["val"]
            experts, top_k = int(w13.shape[0]), int(ids.shape[1])
            biased = any(isinstance(b, fx.Node) for b in (n.args[6:8] or [n.kwargs.get("b13"), n.kwargs.get("b2")]))
            out.append({"node": n.name, "experts": experts, "top_k": top_k,
                        "activation": n.args[5] + (" with biases" if biased else ""),
                        "plans": {m: plan_fused_moe(m, top_k, experts).describe() for m in sizes}})
    return out


def linear_paths(gm: fx.GraphModule, capture_sizes: Sequence[int]) -> List[Dict[str, Any]]:
    """kunlun::linear / gated_linear / linear_group calls grouped by weight shapes: how many, and the
    kernel at each shown size.  A group's `out_features` lists its weights' (one launch for all at GEMV sizes)."""
    sizes = [s for s in SHOWN_SIZES if s in set(capture_sizes)] or list(capture_sizes)[:8]
    groups: Dict[tuple, List[str]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        gated = n.target is torch.ops.kunlun.gated_linear.default
        if n.target is torch.ops.kunlun.linear.default:
            ws = [n.args[1]]
        elif gated:
            ws = [n.args[2]]
        elif n.target is torch.ops.kunlun.linear_group.default:
            ws = list(n.args[1])
        else:
            continue
        shapes = [w.meta["val"].shape for w in ws]
        groups.setdefault((tuple(int(s[0]) for s in shapes), int(shapes[0][1]), gated), []).append(n.name)

    def describe(m, ns, K, gated):
        if not gated:
            return describe_linear_group(m, ns, K)
        plan = plan_gated_linear(m, ns[0], K)
        return plan.describe() + (", gated product in the prologue" if plan.path == "gemv" else
                                  ", with product / epilogue kernels around it")
    return [{"out_features": list(ns), "in_features": K, "gated": gated, "nodes": names,
             "plans": {m: describe(m, ns, K, gated) for m in sizes}} for (ns, K, gated), names in groups.items()]


def _guard_sources(fn, module, depth: int = 3) -> List[str]:
    """The source of a guard and of the functions of its module it calls (a lambda calling `_guard(b, ...)`,
    a guard calling its helpers), `depth` calls deep."""
    try:
        sources = [inspect.getsource(fn)]
    except (OSError, TypeError):
        return []
    for name in fn.__code__.co_names if depth else ():
        called = getattr(module, name, None)
        if inspect.isfunction(called) and called.__module__ == module.__name__ and called is not fn:
            sources += _guard_sources(called, module, depth - 1)
    return sources


def _guard_checks(rule) -> Dict[str, List[str]]:
    """The checks a rule's guard makes, read from its source and its module's functions it calls: the
    shared guard helpers it calls and the refusals it writes itself."""
    module = inspect.getmodule(rule.guard)  # the rule's module (its search may live in model code)
    if module is None or not inspect.isfunction(rule.guard):
        return {"checks": [], "refusals": []}
    src = "\n".join(dict.fromkeys(_guard_sources(rule.guard, module)))
    return {"checks": sorted(set(re.findall(r"\bg\.(\w+)\(", src)) - {"first"}),
            "refusals": [s.split("{")[0].strip(" :,") for s in re.findall(r'Refusal\(f?"([^"]+)"', src)]}


def pattern_catalog() -> Dict[str, List[Dict[str, Any]]]:
    """pass name -> its rules: what each matches (the search function), the ops it needs, its guards."""
    catalog = {}
    for family, rules in FAMILY_RULES.items():
        rows = []
        for r in rules:
            doc = (inspect.getdoc(r.search) or "").split("\n")[0]
            rows.append({"rule": r.name, "matches": r.search.__name__ + (f": {doc}" if doc else ""),
                         "needs": [str(t) for t in r.needs], "dtypes": [str(d).replace("torch.", "") for d in r.dtypes],
                         **_guard_checks(r)})
        catalog[family] = rows
    return catalog
