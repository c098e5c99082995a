"""`kunlun-compile`: see what the backend does to a model.

    kunlun-compile demo                         compile a built-in model, show each pass and the check
    kunlun-compile passes                       every pass, in order, and whether it is enabled
    kunlun-compile explain qwen3-tiny --json    compile, run beside eager, print the report
    kunlun-compile explain my_model.py:make     the same for a factory returning (module, inputs)
    kunlun-compile explain qwen3-next-tiny --dtype bf16 --source
                                                ... with each generated kernel's KIR and Triton source
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from ..backend import KunlunBackend
from ..config import GRAPH_MODES, CompileConfig
from ..lowering import TARGETS
from ..models import builtin_names
from ..passes import default_passes
from .targets import DTYPES, compare_outputs, resolve_target, run_compiled

DEMO_MODEL = "qwen3-next-tiny"


def _config(args) -> CompileConfig:
    options = {"disable": list(args.disable or [])}
    if args.strict:
        options["strict"] = True
    if args.graph_mode:
        options["graph_mode"] = args.graph_mode
    if args.fast_math:
        options["fast_math"] = True
    if args.lowering_target:
        options["target"] = args.lowering_target
    return CompileConfig.from_options(options)


def explain_target(spec: str, config: CompileConfig, dtype: torch.dtype, num_tokens: int) -> dict:
    """Compile `spec`, run it beside eager, and return the report as one JSON-ready dict."""
    target = resolve_target(spec, dtype=dtype, num_tokens=num_tokens)
    backend = KunlunBackend(config)
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
        "_report": backend.report,
    }


def cmd_explain(args) -> int:
    result = explain_target(args.target, _config(args), DTYPES[args.dtype], args.tokens)
    report = result.pop("_report")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(report)
        _print_generated(report, args.source)
        print()
        _print_check(result)
    return 0 if result["ok"] else 1


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


def cmd_demo(args) -> int:
    config = _config(args)
    dtype = DTYPES[args.dtype]
    print(f"kunlun_compile demo: torch {torch.__version__}, compiling the built-in model {args.model!r} "
          f"({args.dtype}, {args.tokens} tokens) with backend='kunlun'\n")
    result = explain_target(args.model, config, dtype, args.tokens)
    print(result.pop("_report"))
    print()
    _print_check(result)
    print("\nall built-in models:")
    print(f"  {'model':<18} {'kernels before':>14} {'after':>6} {'rel_err':>10}  check")
    failures = 0 if result["ok"] else 1
    for name in builtin_names():
        r = explain_target(name, config, dtype, args.tokens)
        failures += 0 if r["ok"] else 1
        print(f"  {name:<18} {sum(r['kernels_before'].values()):>14} {sum(r['kernels'].values()):>6} "
              f"{r['rel_err']:>10.2e}  {'OK' if r['ok'] else 'MISMATCH'}")
    return 1 if failures else 0


def cmd_passes(args) -> int:
    config = _config(args)
    rows = [{"name": p.name, "description": p.description, "enabled": config.is_enabled(p.name)}
            for p in default_passes()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for i, r in enumerate(rows):
        state = "on " if r["enabled"] else "off"
        print(f"{i:>2}. [{state}] {r['name']:<20} {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kunlun-compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)

    def common(p, target: bool):
        if target:
            p.add_argument("target", help=f"built-in model ({', '.join(builtin_names())}) or file.py:factory")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        p.add_argument("--tokens", type=int, default=16, help="tokens per call for built-in models")
        p.add_argument("--disable", action="append", metavar="PASS", help="turn a pass off (repeatable)")
        p.add_argument("--strict", action="store_true", help="raise instead of falling back")
        p.add_argument("--graph-mode", choices=GRAPH_MODES, default=None,
                       help="graph runtime mode (default auto: piecewise on CUDA, none elsewhere)")
        p.add_argument("--fast-math", action="store_true",
                       help="approximate SFU forms for every math function, no intermediate bf16/fp16 rounding")
        p.add_argument("--lowering-target", choices=sorted(TARGETS), default=None,
                       help="target description for instruction selection and cost estimates (default cuda)")
        p.add_argument("--json", action="store_true", help="one JSON object instead of tables")

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

    p = sub.add_parser("passes", help="list the passes in order", description="Example: kunlun-compile passes")
    common(p, target=False)
    p.set_defaults(func=cmd_passes)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
