"""The compile reports of vLLM's worker processes, written per rank and read from anywhere.

With tensor parallelism (or vLLM's engine in its own process, the default) the compiles happen
in worker processes, so `kunlun_compile.last_report()` in the user's process is empty.  Each
worker writes its report after every piece it compiles or loads:

    <vLLM cache>/torch_compile_cache/<hash>/rank_<r>_<dp>/kunlun_report.json   (mode 3, always)
    <dump dir>/kunlun_report.json  or  <dump dir>/rank_<r>/kunlun_report.json  (KUNLUN_COMPILE_DUMP / dump_dir)

`find_reports(path)` reads every report under a folder (a dump dir, one vLLM cache dir, or the
whole cache root), newest first; `select` picks the last engine's; `format_reports` prints them,
one block per rank.  None of these needs vLLM.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional

from ..capture.record import dump_dir

REPORT_NAME = "kunlun_report.json"
FORMAT = 1


def default_root() -> str:
    """Where reports are looked for when no folder is given: the dump dir, else vLLM's cache root."""
    # VLLM_CACHE_ROOT and XDG_CACHE_HOME are vLLM's variables (its cache root, as vLLM computes it),
    # read here directly; the KUNLUN_COMPILE_* ones go through config.py (dump_dir does)
    root = dump_dir() or os.environ.get("VLLM_CACHE_ROOT") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm")
    return root


def write_report(folders: Iterable[str], *, rank: int, report, warm_start: Optional[dict] = None,
                 **info: Any) -> List[str]:
    """Write this process's report as `folder/kunlun_report.json` for each folder; returns the paths.
    A report is replaced whole (written aside, then renamed), so a reader never sees half of one."""
    doc = {"format": FORMAT, "rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
           "written_at": time.time(), **info, "summary": report.summary(),
           "warm_start": warm_start or {}, "graphs": [g.as_dict() for g in report.graphs]}
    text = json.dumps(doc, indent=1, default=str)
    paths = []
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".report_tmp_", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        path = os.path.join(folder, REPORT_NAME)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def find_reports(path: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every worker report under `path` (default `default_root()`), newest first; each with its "path".
    An unreadable file is listed with an "error" instead of being skipped silently."""
    root = path or default_root()
    found = []
    for folder, _dirs, files in os.walk(root):
        if REPORT_NAME not in files:
            continue
        file = os.path.join(folder, REPORT_NAME)
        try:
            with open(file) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            doc = {"error": f"{type(e).__name__}: {e}", "written_at": 0}
        doc["path"] = file
        found.append(doc)
    found.sort(key=lambda d: (-d.get("written_at", 0), d.get("rank", 0)))
    return found


def latest_run(reports: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The reports of the most recent engine: those in the newest report's run folder (its vLLM cache
    dir, or its dump dir), by rank."""
    if not reports:
        return []
    run = _run_folder(reports[0])
    return sorted((r for r in reports if _run_folder(r) == run), key=lambda r: r.get("rank", 0))


def _run_folder(report: Dict[str, Any]) -> str:
    folder = os.path.dirname(report["path"])
    # rank_<r>_<dp> (vLLM's cache) or rank_<r> (a dump dir): the run is the folder above
    return os.path.dirname(folder) if os.path.basename(folder).startswith("rank_") else folder


def format_reports(reports: List[Dict[str, Any]]) -> str:
    if not reports:
        return "(no kunlun worker reports found)"
    blocks = []
    for r in reports:
        if "error" in r:
            blocks.append(f"{r['path']}: unreadable ({r['error']})")
            continue
        s, warm = r["summary"], r.get("warm_start") or {}
        patterns = ", ".join(f"{k} {v}" for k, v in s["patterns"].items() if v) or "none"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["written_at"]))
        lines = [f"rank {r['rank']} (pid {r['pid']}, {when}) {r.get('model', '')}",
                 f"  {r['path']}",
                 f"  graphs {s['graphs']}, fused: {patterns}; kernels {s['kernels']}"]
        if warm:
            lines.append(f"  warm start: {warm.get('compiled', 0)} compiled, {warm.get('loaded', 0)} loaded")
            lines.extend(f"    {e['graph']}: {e['event']}" + (f" ({e['reason']})" if e["reason"] else "")
                         for e in warm.get("events", []) if e["event"] not in ("loaded", "compiled"))
        lines.extend(f"  FALLBACK {f['graph']} in {f['pass']}: {f['reason']}" for f in s["fallbacks"])
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def select(path: Optional[str] = None, all_runs: bool = False) -> List[Dict[str, Any]]:
    """What a `kunlun-compile reports [PATH] [--all]` verb shows: the last engine's reports by rank
    (every report found, with `all_runs`), then any unreadable report file."""
    found = find_reports(path)
    readable = [r for r in found if "error" not in r]
    return (readable if all_runs else latest_run(readable)) + [r for r in found if "error" in r]
