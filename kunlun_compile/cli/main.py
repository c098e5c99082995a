"""`kunlun-compile`: see what the backend does to a model, and find what went wrong.

TARGET is a built-in model, `file.py:factory` returning (module, inputs), or a graph directory
recorded with KUNLUN_COMPILE_DUMP=DIR.  Every verb takes --json.

    kunlun-compile demo                          compile a built-in model, show each pass and the check
    kunlun-compile passes                        every pass and its patterns, guards, on/off
    kunlun-compile explain qwen3-tiny            per graph: passes, matches, near misses, kernels, pieces
    kunlun-compile explain qwen3-tiny --pass add_rmsnorm    one pass: its diff and near misses
    kunlun-compile record qwen3-moe-tiny /tmp/graphs        write the graphs the backend receives
    kunlun-compile explain /tmp/graphs/graph_0   ... and work on one offline
    kunlun-compile bisect my_model.py:make       first pass, then first rewrite, that breaks the output
    kunlun-compile align qwen3-next-tiny --html align.html  every surviving node against eager
    kunlun-compile bench qwen3-moe-tiny          eager / inductor / kunlun: time, launches, where it goes
    kunlun-compile graph qwen3-next-tiny -o graph.html      the graph's pieces and fusion groups, drawn

Exit status: 0 done; 1 the compiled output left eager's tolerance (explain, demo) or nothing was
recorded (record); 2 an error, said in one line (--verbose: with its traceback; --json: as an object
{"ok": false, "error": ...}).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import traceback
from typing import Any, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_map

from ..backend import KunlunBackend
from ..config import GRAPH_MODES, CompileConfig
from ..lowering import TARGETS
from ..models import builtin_names
from ..passes import default_passes
from ..debug.align import align
from ..debug.align import html_report as align_html
from ..debug.align import runtime_summary
from ..debug.bench import bench
from ..debug.bisect import Bisector
from ..debug.explain import linear_paths, moe_paths, pass_detail, pattern_catalog
from ..debug.graph_view import KINDS, describe, to_dot
from ..debug.graph_view import html_page as graph_html
from ..debug.inspect import InspectingBackend
from ..debug.targets import DEFAULT_TOKENS, DTYPES, TargetError, compare_outputs, resolve_target, run_compiled
from .errors import (CliError, UsageError, check_writable_dir, check_writable_file, positive_int,
                     write_text)
from ..capture.recompiles import describe_hit, watching_recompile_limit

DEMO_MODEL = "qwen3-next-tiny"
EXIT_MISMATCH, EXIT_ERROR = 1, 2

# A verb returns its exit status and what --json prints (it has printed its text itself otherwise).
Outcome = Tuple[int, Any]


def _config(args) -> CompileConfig:
    options = {"disable": list(args.disable or [])}
    if args.strict:
        options["strict"] = True
    if args.graph_mode:
        options["graph_mode"] = args.graph_mode
    if args.fast_math:
        options["fast_math"] = True
    if args.no_fusion:
        options["fusion"] = False
    if args.lowering_target:
        options["target"] = args.lowering_target
    try:
        config = CompileConfig.from_options(options)  # also reads KUNLUN_COMPILE_* variables
        KunlunBackend(config)  # a --disable naming no pass is an error here, before any compile
    except (ValueError, TypeError) as e:
        raise CliError(str(e)) from e
    return config


def _dtype(args) -> Optional[torch.dtype]:
    return DTYPES[args.dtype] if args.dtype else None


def _target(args):
    return resolve_target(args.target, dtype=_dtype(args), num_tokens=args.tokens)


def explain_target(spec: str, config: CompileConfig, dtype: Optional[torch.dtype],
                   num_tokens: Optional[int]) -> dict:
    """Compile `spec`, run it beside eager, and return the report as one JSON-ready dict."""
    target = resolve_target(spec, dtype=dtype, num_tokens=num_tokens)
    backend = InspectingBackend(config)
    got, want = run_compiled(target, backend)
    cmp = compare_outputs(got, want)
    summary = backend.report.summary()
    return {
        "target": target.name,
        "ok": cmp.ok,
        "max_abs_err": cmp.max_abs_err,
        "rel_err": cmp.rel_err,
        "tolerance": cmp.tolerance,
        **summary,
        "graph_reports": [g.as_dict() for g in backend.report.graphs],
        "moe_paths": [dict(graph=k.name, **m) for k in backend.kept if k.after is not None
                      for m in moe_paths(k.after, config.capture_sizes)],
        "linear_paths": [dict(graph=k.name, **m) for k in backend.kept if k.after is not None
                         for m in linear_paths(k.after, config.capture_sizes)],
        "_report": backend.report,
    }


def cmd_explain(args) -> Outcome:
    if args.pass_name and args.pass_name not in [p.name for p in default_passes()]:
        raise CliError(f"no pass named {args.pass_name!r}; see `kunlun-compile passes`")
    result = explain_target(args.target, _config(args), _dtype(args), args.tokens)
    report = result.pop("_report")
    if args.pass_name:
        result["pass_detail"] = [pass_detail(g, args.pass_name) for g in report.graphs if g.passes]
    elif args.diff:
        result["pass_detail"] = [pass_detail(g, p.name) for g in report.graphs for p in g.passes]
    code = 0 if result["ok"] else EXIT_MISMATCH
    if args.json:
        return code, result
    if args.pass_name or args.diff:
        for d in result["pass_detail"]:
            print(f"graph {d['graph']}, pass {d['pass']}: {d['nodes_before']} -> {d['nodes_after']} nodes, "
                  f"{d['matches']} matches {d['patterns'] or ''} {d['skipped'] or ''}")
            for line in d["near_misses"]:
                print(f"  near miss: {line}")
            print("\n".join(d["diff"]) if d["diff"] else "  (graph unchanged)")
    else:
        print(report)
        _print_generated(report, args.source)
        _print_moe_paths(result["moe_paths"])
        _print_linear_paths(result["linear_paths"])
    print()
    _print_check(result)
    return code, result


def _print_moe_paths(paths) -> None:
    for m in paths:
        print(f"\n{m['graph']}/{m['node']}: fused_moe, {m['experts']} experts, top-{m['top_k']}, "
              f"{m['activation']}; path by tokens:")
        for size, plan in m["plans"].items():
            print(f"  {size:>5}: {plan}")


def _print_linear_paths(paths) -> None:
    for m in paths:
        plans = list(m["plans"].items())
        runs = []  # consecutive sizes with the same kernel, as "1-4: GEMV ..."
        for size, plan in plans:
            if runs and runs[-1][2] == plan:
                runs[-1][1] = size
            else:
                runs.append([size, size, plan])
        what = "linear" if len(m["out_features"]) == 1 else "linear group (one launch)"
        what = "gated linear" if m.get("gated") else what
        shape = "+".join(map(str, m["out_features"]))
        print(f"\n{m['graph']}: {what} {shape}x{m['in_features']} (x{len(m['nodes'])}); kernel by tokens:")
        for lo, hi, plan in runs:
            print(f"  {lo if lo == hi else f'{lo}-{hi}':>9}: {plan}")


def _print_generated(report, with_source: bool) -> None:
    """Each distinct generated kernel once: its KIR listing (and Triton source with --source)."""
    seen = set()
    for g in report.graphs:
        for k in g.generated:
            if k["key"] in seen:
                continue
            seen.add(k["key"])
            print()
            print(k["listing"])
            print(f"  ; Triton source: {k['source_path']}")
            if with_source and k.get("source"):
                print(k["source"])


def _print_check(result: dict) -> None:
    kb, ka = result["kernels_before"], result["kernels"]
    print(f"kernels: {sum(kb.values())} before -> {sum(ka.values())} after  "
          f"(fused {ka['fused']}, pointwise {ka['pointwise']}, aten {ka['aten']})")
    fams = ", ".join(f"{k} {v}" for k, v in result["patterns"].items())
    print(f"patterns: {fams}")
    print(f"generated kernels: {ka['pointwise']} ({result['vector_ops']} vector, {result['sfu_ops']} SFU instructions)")
    print(f"pieces: {result['pieces']}   fallbacks: {len(result['fallbacks'])}")
    verdict = "OK" if result["ok"] else "MISMATCH"
    print(f"check vs eager: {verdict}  rel_err {result['rel_err']:.3e}  max_abs_err {result['max_abs_err']:.3e}  "
          f"(tolerance {result['tolerance']:.0e})")


def cmd_demo(args) -> Outcome:
    config = _config(args)
    dtype = _dtype(args) or torch.float32
    tokens = args.tokens or DEFAULT_TOKENS
    if not args.json:
        print(f"kunlun_compile demo: torch {torch.__version__}, compiling the built-in model {args.model!r} "
              f"({str(dtype)[6:]}, {tokens} tokens) with backend='kunlun'\n")
    result = explain_target(args.model, config, dtype, tokens)
    report = result.pop("_report")
    if not args.json:
        print(report)
        print()
        _print_check(result)
        print("\nall built-in models:")
        print(f"  {'model':<18} {'kernels before':>14} {'after':>6} {'rel_err':>10}  check")
    models = []
    for name in builtin_names():
        r = explain_target(name, config, dtype, tokens)
        r.pop("_report")
        row = {"model": name, "kernels_before": sum(r["kernels_before"].values()),
               "kernels_after": sum(r["kernels"].values()), "rel_err": r["rel_err"], "ok": r["ok"]}
        models.append(row)
        if not args.json:
            print(f"  {name:<18} {row['kernels_before']:>14} {row['kernels_after']:>6} "
                  f"{row['rel_err']:>10.2e}  {'OK' if row['ok'] else 'MISMATCH'}")
    ok = result["ok"] and all(m["ok"] for m in models)
    payload = {"ok": ok, "torch": torch.__version__, "model": args.model, "dtype": str(dtype)[6:],
               "tokens": tokens, "result": result, "models": models}
    return (0 if ok else EXIT_MISMATCH), payload


def cmd_passes(args) -> Outcome:
    config = _config(args)
    catalog = pattern_catalog()
    rows = [{"name": p.name, "description": p.description,
             "enabled": config.is_enabled(p.name) and (config.fusion or not p.family),
             "patterns": catalog.get(p.name, [])} for p in default_passes()]
    if args.json:
        return 0, rows
    for i, r in enumerate(rows):
        state = "on " if r["enabled"] else "off"
        print(f"{i:>2}. [{state}] {r['name']:<20} {r['description']}")
        for rule in r["patterns"]:
            needs = f"  needs {', '.join(rule['needs'])}" if rule["needs"] else ""
            checks = f"  guard: {', '.join(rule['checks'])}" if rule["checks"] else ""
            print(f"      {rule['rule']:<34} {rule['matches'][:60]}{needs}{checks}")
    return 0, rows


def cmd_record(args) -> Outcome:
    """Compile TARGET recording into OUT_DIR (as KUNLUN_COMPILE_DUMP=OUT_DIR does); list what was written."""
    check_writable_dir(args.out_dir, "OUT_DIR")
    config = _config(args).replace(dump_dir=args.out_dir)  # as KUNLUN_COMPILE_DUMP=OUT_DIR would
    result = explain_target(args.target, config, _dtype(args), args.tokens)
    report = result.pop("_report")
    written = [g.recorded_at for g in report.graphs if g.recorded_at]
    payload = {"target": args.target, "recorded": written, "ok": result["ok"],
               "patterns": result["patterns"], "kernels": result["kernels"]}
    if not args.json:
        for path in written:
            print(f"recorded {path}  (try: kunlun-compile explain {path})")
        if not written:
            print(f"nothing was recorded under {args.out_dir}: the backend received no graph it could write "
                  f"(see the warnings above)", file=sys.stderr)
    return (0 if written else EXIT_MISMATCH), payload


def cmd_bisect(args) -> Outcome:
    config = _config(args)
    result = Bisector(_target(args), config).run()
    if args.json:
        return 0, result
    for p in result["probes"]:
        print(f"  {'ok ' if p['ok'] else 'BAD'} rel_err {p['rel_err']:.3e}  {p['probe']}")
    print(f"\n{result['verdict']}")
    piece = result.get("first_bad_piece")
    if piece:
        print(f"graph {piece['graph']}, piece {piece['piece']}, value {piece['value']}: {piece['check']} "
              f"(rel_err {piece['rel_err']:.3e})")
    bad = result["first_bad_rewrite"]
    if bad:
        print(f"graph {bad['graph']}, rewrite {bad['index']} of {bad['of']}: {bad['description']} "
              f"(rel_err {bad['rel_err']:.3e} > {bad['tolerance']:.0e})\nthe matched nodes, before the pass:")
        print(bad["context"])
    return 0, result


def cmd_reports(args) -> Outcome:
    """The compile reports vLLM's worker processes wrote, one per rank (kunlun_compile/vllm/reports.py)."""
    from ..vllm.reports import format_reports, select

    reports = select(args.path, all_runs=args.all)
    if not args.json:
        print(format_reports(reports))
    return (0 if reports else EXIT_MISMATCH), reports


def cmd_align(args) -> Outcome:
    if args.html:
        check_writable_file(args.html, "--html")
    config = _config(args)
    result = align(_target(args), InspectingBackend(config))
    if args.html:
        write_text(args.html, align_html(result), "--html")
    runtime = result["runtime"]
    code = EXIT_MISMATCH if runtime.get("checked") and (runtime["replay_checks_failed"] or not runtime["output_ok"]) \
        else 0
    if args.json:
        return code, {k: v for k, v in result.items() if k != "nodes" or args.all}
    print(f"{result['aligned']} of {result['nodes_compared']} nodes aligned within tolerance "
          f"({100 * result['aligned_share']:.1f}%)")
    print(runtime_summary(result["runtime"]))
    first = result["first_divergence"]
    if first:
        print(f"first divergence: {first['graph']}/{first['node']} ({first['op']}"
              f"{', stands for ' + first['replaces'] if first['replaces'] else ''}) rel_err {first['rel_err']:.3e}")
    print(f"\n  {'node':<22} {'stands for':<16} {'op':<34} {'rel_err':>10} {'tol':>7}")
    for r in result["worst"]:
        print(f"  {r['node']:<22} {r['replaces'] or '':<16} {r['op'][:34]:<34} {r['rel_err']:>10.3e} "
              f"{r.get('tolerance', 0):>7.0e} {'' if r['ok'] else ' OUT'}")
    if args.html:
        print(f"\nHTML report: {args.html}")
    return code, result


def _on_device(target, device: str):
    if not isinstance(target.module, torch.nn.Module):
        raise CliError(f"--device {device}: {target.name} is not a torch.nn.Module, so its weights cannot be moved")
    inputs = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, target.inputs)
    return dataclasses.replace(target, module=target.module.to(device), inputs=tuple(inputs))


def cmd_bench(args) -> Outcome:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                       "False); run on a GPU machine or leave --device out")
    config = _config(args)
    target = _target(args)
    if args.device == "cuda":
        target = _on_device(target, "cuda")
    variants = {"eager": lambda: target.module,
                "inductor": lambda: torch.compile(target.module),
                "kunlun": lambda: torch.compile(target.module, backend=KunlunBackend(config))}
    if args.no_inductor:
        variants.pop("inductor")
    result = bench(target, variants, reps=args.reps)
    if args.json:
        return 0, result
    print(f"{result['target']} on {result['device']}, median of {result['reps']} calls")
    print(f"  {'variant':<10} {'ms/call':>9} {'launches':>9} {'fused us':>9} {'gen. us':>9} {'ATen us':>9} "
          f"{'host us':>9}  check")
    for r in result["rows"]:
        if "error" in r:
            print(f"  {r['variant']:<10} failed: {r['error']}")
            continue
        us = r["us"]
        print(f"  {r['variant']:<10} {r['ms_per_call']:>9.3f} {sum(r['launches'].values()):>9.0f} {us['fused']:>9.0f} "
              f"{us['generated']:>9.0f} {us['aten']:>9.0f} {us['host']:>9.0f}  "
              f"{'OK' if r['matches_eager'] else 'MISMATCH'}")
    return 0, result


def cmd_graph(args) -> Outcome:
    out = args.output or ("graph.svg" if args.format == "svg" else "graph.html")
    if args.format == "svg" and shutil.which("dot") is None:
        raise CliError("--format svg needs graphviz's `dot`; without it use the default HTML")
    check_writable_file(out, "-o/--output")
    config = _config(args)
    target = _target(args)
    backend = InspectingBackend(config)
    run_compiled(target, backend)
    graphs = [(k.name, describe(k.after, backend.config.splitting_ops)) for k in backend.kept if k.after is not None]
    if args.format == "svg":
        import subprocess
        dot = "\n".join(to_dot(d) for _, d in graphs[:1])
        done = subprocess.run(["dot", "-Tsvg", "-o", out], input=dot, text=True, capture_output=True)
        if done.returncode:
            raise CliError(f"graphviz's dot failed writing {out}: {done.stderr.strip()[:300]}")
    else:
        write_text(out, graph_html(graphs, f"kunlun-compile graph: {args.target}"), "-o/--output")
    summary = [{"graph": name, "pieces": len(d["pieces"]), "nodes": len(d["nodes"]),
                "kinds": {k: sum(1 for n in d["nodes"] if n["kind"] == k) for k in KINDS}} for name, d in graphs]
    payload = {"target": args.target, "output": out, "graphs": summary}
    if not args.json:
        for g in summary:
            print(f"{g['graph']}: {g['pieces']} pieces, {g['nodes']} nodes "
                  f"({', '.join(f'{k} {v}' for k, v in g['kinds'].items() if v)})")
        print(f"written: {out}")
    return 0, payload


class _Parser(argparse.ArgumentParser):
    """argparse's complaints raise (UsageError) instead of exiting, so that --json can answer them too."""

    def error(self, message):
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kunlun-compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    def common(p, target: bool):
        if target:
            p.add_argument("target", help=f"built-in model ({', '.join(builtin_names())}), file.py:factory "
                                          f"(returning (module, example_inputs)) or a recorded graph directory")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="built-in models: their dtype (default float32); file.py:factory: the module and its "
                            "floating inputs are cast to it")
        p.add_argument("--tokens", type=positive_int, default=None,
                       help=f"tokens per call: built-in models (default {DEFAULT_TOKENS}); file.py:factory gets it "
                            f"as its `tokens` argument")
        p.add_argument("--disable", action="append", metavar="PASS", help="turn a pass off (repeatable)")
        p.add_argument("--no-fusion", action="store_true",
                       help="every fusion pass off: the generic lowering alone (to measure it)")
        p.add_argument("--strict", action="store_true", help="raise instead of falling back")
        p.add_argument("--graph-mode", choices=GRAPH_MODES, default=None,
                       help="graph runtime mode (default auto: piecewise on CUDA, none elsewhere)")
        p.add_argument("--fast-math", action="store_true",
                       help="approximate SFU forms for every math function, no intermediate bf16/fp16 rounding")
        p.add_argument("--lowering-target", choices=sorted(TARGETS), default=None,
                       help="target description for instruction selection and cost estimates (default cuda)")
        p.add_argument("--json", action="store_true", help="one JSON object instead of tables (errors too)")
        p.add_argument("--verbose", action="store_true", help="print an error's traceback, not just its message")

    p = sub.add_parser("demo", help="compile a built-in model and show what each pass did",
                       description="Compile a built-in model, show per-pass results, kernel counts and the check "
                                   "against eager.  Example: kunlun-compile demo --model qwen3-moe-tiny")
    p.add_argument("--model", default=DEMO_MODEL, choices=builtin_names())
    common(p, target=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("explain", help="compile TARGET beside eager and report",
                       description="Examples: kunlun-compile explain qwen3-tiny --json --disable dead_code\n"
                                   "          kunlun-compile explain qwen3-next-tiny --dtype bf16 "
                                   "--lowering-target kunlun-xpu --source",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p, target=True)
    p.add_argument("--source", action="store_true", help="also print each generated kernel's Triton source")
    p.set_defaults(func=cmd_explain)

    p.add_argument("--pass", dest="pass_name", metavar="NAME",
                   help="narrow to one pass: its graph diff, matches and near misses")
    p.add_argument("--diff", action="store_true", help="every pass's graph diff, in order")

    p = sub.add_parser("passes", help="every pass and its patterns, in order",
                       description="Example: kunlun-compile passes --disable add_rmsnorm")
    common(p, target=False)
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("record", help="compile TARGET and write each graph the backend receives",
                       description="Example: kunlun-compile record qwen3-moe-tiny /tmp/graphs\n"
                                   "In your own program: KUNLUN_COMPILE_DUMP=/tmp/graphs python serve.py\n"
                                   "Then: kunlun-compile explain /tmp/graphs/graph_0",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p, target=True)
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("bisect", help="the first pass, then the first rewrite, that breaks the output",
                       description="Example: kunlun-compile bisect my_model.py:make --dtype bf16")
    common(p, target=True)
    p.set_defaults(func=cmd_bisect)

    p = sub.add_parser("reports", help="the compile reports of vLLM's worker processes, per rank",
                       description="Example: kunlun-compile reports /tmp/kunlun-dump\n"
                                   "PATH: a dump dir, a vLLM cache dir or cache root "
                                   "(default $KUNLUN_COMPILE_DUMP, else $VLLM_CACHE_ROOT or ~/.cache/vllm)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?")
    p.add_argument("--all", action="store_true", help="every report found, not only the last engine's")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reports)

    p = sub.add_parser("align", help="compare every node of the compiled graph with eager",
                       description="Example: kunlun-compile align qwen3-next-tiny --html align.html")
    common(p, target=True)
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    p.add_argument("--all", action="store_true", help="with --json: every compared node, not just the worst")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("bench", help="eager vs inductor vs kunlun: time, launches, where it goes",
                       description="Example: kunlun-compile bench qwen3-moe-tiny --device cuda --dtype bf16")
    common(p, target=True)
    p.add_argument("--reps", type=positive_int, default=20, help="timed calls per variant (>= 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-inductor", action="store_true", help="skip inductor (e.g. no C++ compiler on a CPU box)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("graph", help="draw the graph's pieces and fusion groups",
                       description="Example: kunlun-compile graph qwen3-next-tiny -o graph.html")
    common(p, target=True)
    p.add_argument("-o", "--output", metavar="PATH")
    p.add_argument("--format", choices=("html", "svg"), default="html", help="svg needs graphviz's dot")
    p.set_defaults(func=cmd_graph)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json, verbose = "--json" in argv, "--verbose" in argv
    context = {"verb": argv[0] if argv and not argv[0].startswith("-") else None}
    try:
        args = build_parser().parse_args(argv)
        context["target"] = getattr(args, "target", None)
        with watching_recompile_limit() as limit_hits:
            code, payload = args.func(args)
    except Exception as e:  # noqa: BLE001 - every failure ends as one line (or one JSON object)
        return _report_error(e, as_json, verbose, context)
    _report_recompile_limit(limit_hits, payload, as_json)
    if as_json:
        print(json.dumps(payload, indent=1))
    return code


def _report_recompile_limit(hits, payload, as_json: bool) -> None:
    """Dynamo ran part of the model eagerly (recompile limit): say so in the output."""
    if isinstance(payload, dict):
        payload["recompile_limit_hits"] = hits
    if not as_json:
        for hit in hits:
            print(f"note: {describe_hit(hit)}")


def _error_message(e: Exception) -> str:
    if isinstance(e, (CliError, TargetError)):
        return str(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _report_error(e: Exception, as_json: bool, verbose: bool, context: dict) -> int:
    message = _error_message(e)
    if verbose:
        traceback.print_exc()
    if as_json:
        print(json.dumps({"ok": False, "error": message, "error_type": type(e).__name__, **context}, indent=1))
        return EXIT_ERROR
    if isinstance(e, UsageError):
        hint = f"  (see {e.parser.prog} --help)"
    elif isinstance(e, (CliError, TargetError)) or verbose:
        hint = ""
    else:
        hint = "  (--verbose shows the traceback)"
    print(f"error: {message}{hint}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
