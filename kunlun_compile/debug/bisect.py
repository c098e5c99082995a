"""`kunlun-compile bisect`: the first pass, then the first single rewrite, after which the
compiled output leaves eager's tolerance.

First the runtime: with a graph mode that captures pieces, the target runs over several calls in
that mode (replays checked piece by piece, runtime_align.py); if only that mode is out of
tolerance, the first piece and value whose replay differs is the answer.  Otherwise passes are
bisected with graph mode none.  Passes are switched on in pipeline order: a binary search over how many of
them run finds the first one whose addition breaks the output.  Inside that pass the number of rewrites it may make
is limited (passes/rewrites.py) and searched the same way.  Each probe is a fresh compile, so a
bisect costs about 2 + log2(passes) + log2(rewrites) compiles.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..backend import KunlunBackend
from ..config import CompileConfig
from ..passes.rewrites import RewriteLog, limit_rewrites
from .runtime_align import CALLS, graph_mode_of, run_replays
from .targets import Comparison, Target, compare_outputs


@dataclasses.dataclass
class Probe:
    label: str
    comparison: Comparison
    backend: KunlunBackend
    log: Optional[RewriteLog]

    def as_dict(self) -> dict:
        return {"probe": self.label, "ok": self.comparison.ok, "rel_err": self.comparison.rel_err}


class Bisector:
    def __init__(self, target: Target, config: CompileConfig):
        self.target = target
        self.config = config
        self.pass_names = [n for n in KunlunBackend(config).pass_manager.names if config.is_enabled(n)]
        with torch.inference_mode():
            self.want = target.module(*target.inputs)
        self.trail: List[Probe] = []
        self._done: Dict[tuple, Probe] = {}

    def probe(self, passes_on: int, limit: Optional[Tuple[str, Optional[int]]] = None) -> Probe:
        """Compile with the first `passes_on` passes (optionally limiting one pass's rewrites) and compare."""
        key = (passes_on, limit)
        if key not in self._done:
            self._done[key] = self._probe(passes_on, limit)
        return self._done[key]

    def _probe(self, passes_on: int, limit: Optional[Tuple[str, Optional[int]]]) -> Probe:
        off = tuple(self.pass_names[passes_on:])
        config = dataclasses.replace(self.config, disable=tuple(dict.fromkeys(self.config.disable + off)),
                                     graph_mode="none")  # the passes alone: the runtime stage comes first
        backend = KunlunBackend(config)
        torch._dynamo.reset()
        compiled = torch.compile(self.target.module, backend=backend)
        scope = limit_rewrites(*limit) if limit else contextlib.nullcontext()
        with scope as log, torch.inference_mode():
            got = compiled(*self.target.inputs)
        label = f"passes 1..{passes_on} ({self.pass_names[passes_on - 1]} last)" if passes_on else "no passes"
        if limit:
            label += f", {limit[0]}: " + ("every rewrite" if limit[1] is None else f"first {limit[1]} rewrite(s)")
        probe = Probe(label, compare_outputs(got, self.want), backend, log)
        self.trail.append(probe)
        return probe

    def run(self) -> Dict[str, Any]:
        n = len(self.pass_names)
        result: Dict[str, Any] = {"passes": self.pass_names, "first_bad_pass": None, "first_bad_rewrite": None,
                                  "first_bad_piece": None}
        if self._runtime_stage(result):
            return self._finish(result, result.pop("verdict"))
        if self.probe(n).comparison.ok:
            return self._finish(result, "the compiled output is within tolerance with every pass on")
        if not self.probe(0).comparison.ok:
            return self._finish(result, "the output differs from eager with every pass off: the cause is "
                                        "capture, lowering-free compilation or the runtime, not a pass")
        lo, hi = 0, n  # probe(lo) ok, probe(hi) bad
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.probe(mid).comparison.ok else (lo, mid)
        culprit = self.pass_names[hi - 1]
        result["first_bad_pass"] = culprit
        every = self.probe(hi, (culprit, None))
        made = every.log.made if every.log else []
        if not made:
            return self._finish(result, f"pass {culprit} breaks the output without any logged rewrite")
        if not self.probe(hi, (culprit, 0)).comparison.ok:
            return self._finish(result, f"pass {culprit} breaks the output before its first rewrite "
                                        "(in the graph clean-up it does first)")
        lo_r, hi_r = 0, len(made)
        while hi_r - lo_r > 1:
            mid = (lo_r + hi_r) // 2
            lo_r, hi_r = (mid, hi_r) if self.probe(hi, (culprit, mid)).comparison.ok else (lo_r, mid)
        bad = self.probe(hi, (culprit, hi_r))
        log = bad.log
        k = hi_r - 1
        graph = log.graphs[k]
        result["first_bad_rewrite"] = {
            "index": hi_r, "of": len(made), "description": log.made[k], "graph": graph, "nodes": log.nodes[k],
            "rel_err": bad.comparison.rel_err, "tolerance": bad.comparison.tolerance,
            "context": graph_context(_code_before(bad.backend, graph, culprit), log.nodes[k]),
        }
        return self._finish(result, f"rewrite {hi_r} of {len(made)} in pass {culprit} ({log.made[k]}) takes the "
                                    f"output out of tolerance")

    def _runtime_stage(self, result: Dict[str, Any]) -> bool:
        """Graph mode none against the chosen mode, over replays; when only the chosen mode is out of
        tolerance, the runtime is the cause: name the first piece and value that diverge.  True when
        this stage found the cause."""
        mode = graph_mode_of(self.config, self.target)
        if mode == "none":
            return False
        chosen = run_replays(self.target, self.config, record=True)
        self.trail.append(Probe(f"every pass, graph mode {mode}, {CALLS} calls", chosen["output"], chosen["backend"],
                                None))
        checks_failed = [r for r in chosen["findings"] if not r["ok"]]
        if chosen["output"].ok and not checks_failed:
            return False
        plain = self.probe(len(self.pass_names))
        if not plain.comparison.ok and not checks_failed:
            return False  # the passes are wrong already without the runtime: bisect them
        first = checks_failed[0] if checks_failed else None
        result["first_bad_piece"] = first
        where = (f"{first['graph']} piece {first['piece']}, value {first['value']} ({first['check']}, "
                 f"rel_err {first['rel_err']:.3g})" if first else "no single piece's replay differs from its plain run")
        result["verdict"] = (f"the runtime: graph mode none is within tolerance and {mode} is not; first divergence: "
                             f"{where}") if plain.comparison.ok else f"the runtime ({mode}) diverges: {where}"
        return True

    def _finish(self, result: Dict[str, Any], verdict: str) -> Dict[str, Any]:
        result["verdict"] = verdict
        result["probes"] = [p.as_dict() for p in self.trail]
        return result


def _code_before(backend: KunlunBackend, graph: str, pass_name: str) -> str:
    for g in backend.report.graphs:
        if g.name == graph:
            for p in g.passes:
                if p.name == pass_name:
                    return p.code_before or ""
    return ""


def graph_context(code: str, names: List[str], around: int = 3) -> str:
    """The lines of `code` that define `names`, marked `>>`, with `around` lines either side."""
    lines = code.splitlines()
    defines = re.compile(r"^\s*(\w+)\s*=")
    hit = [i for i, line in enumerate(lines) if (m := defines.match(line)) and m.group(1) in set(names)]
    if not hit:
        return ""
    lo, hi = max(0, min(hit) - around), min(len(lines), max(hit) + around + 1)
    return "\n".join((">> " if i in hit else "   ") + lines[i].strip() for i in range(lo, hi))
