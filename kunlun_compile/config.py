"""One frozen configuration object, built once per backend and passed down.

Every option the backend understands is a field here.  Options reach it from
`torch.compile(..., options={...})`, from `kunlun_compile.backend(**options)`
and from environment variables; unknown names are an error that lists the
valid ones, so a typo never silently turns a feature off.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple

GRAPH_MODES = ("auto", "none", "piecewise", "full", "full_and_piecewise")
# vLLM's default capture sizes: 1, 2, 4, then every 8 up to 512
DEFAULT_CAPTURE_SIZES = (1, 2, 4) + tuple(range(8, 513, 8))

# Environment variables read once, when a config is built (never mid-compile).
ENV_DISABLE = "KUNLUN_COMPILE_DISABLE"  # comma-separated pass names to skip
ENV_STRICT = "KUNLUN_COMPILE_STRICT"  # "1": raise instead of falling back
ENV_CHECK_REPLAYS = "KUNLUN_COMPILE_CHECK_REPLAYS"  # "1": the replay checker on (runtime/checking.py)


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Every option of the kunlun backend."""

    # Raise on any failure in a pass, lowering or runtime step instead of
    # warning once and running that graph without the failing step.
    strict: bool = False
    # Names of passes to skip (see `kunlun-compile passes`).
    disable: Tuple[str, ...] = ()
    # Keep each pass's before/after graph code in the report (the CLI's diffs read it).
    report: bool = True
    # Graph runtime (runtime/piecewise.py): "auto" (piecewise on CUDA, none elsewhere), "none",
    # "piecewise", "full", "full_and_piecewise".
    graph_mode: str = "auto"
    # Token counts captured; others are padded up to the next one, above the largest run without a graph.
    capture_sizes: Tuple[int, ...] = DEFAULT_CAPTURE_SIZES
    # Extra ops (qualified names, "ns::op") to run outside captured pieces, like attention.
    splitting_ops: Tuple[str, ...] = ()
    # After this many captured sizes, a piece runs further sizes without a graph (one warning).
    max_captures_per_piece: int = 128
    # Check on every replay that parameters/buffers are where they were at capture.
    debug_graph_addresses: bool = False
    # After every replay, check that each value crossing pieces still holds what it held when it was
    # produced, and name the piece and value that changed (runtime/checking.py).  Costs a checksum per
    # crossing value per piece; off by default.
    check_replays: bool = False
    # Element-wise lowering (lowering/): approximate SFU forms for every math function the target's
    # SFU has, and no rounding of intermediate bf16/fp16 results (default: approximate only where a
    # bf16/fp16 result hides the error; eager's roundings kept).
    fast_math: bool = False
    # Target description for instruction selection and cost estimates: "cuda" or "kunlun-xpu".
    target: str = "cuda"
    # Record every graph the backend receives under this directory (as KUNLUN_COMPILE_DUMP=DIR does;
    # see debug/record.py); None: the environment variable decides.
    dump_dir: Optional[str] = None

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(
        cls, options: Optional[Mapping[str, Any]] = None, *, environ: Optional[Mapping[str, str]] = None
    ) -> "CompileConfig":
        """Build a config from user options plus the environment.

        Explicit options win over the environment, except `disable`, where the
        two lists are merged (turning a pass off from the shell must work even
        when the code also disables something).
        """
        options = dict(options or {})
        valid = cls.option_names()
        unknown = sorted(k for k in options if k not in valid)
        if unknown:
            raise ValueError(
                f"kunlun backend: unknown option(s) {unknown}; valid options are {list(valid)}"
            )
        env = os.environ if environ is None else environ
        disable = _as_name_tuple(options.pop("disable", ()))
        env_disable = _as_name_tuple(env.get(ENV_DISABLE, ""))
        options["disable"] = tuple(dict.fromkeys(disable + env_disable))
        if "strict" not in options:
            env_strict = parse_bool_setting(ENV_STRICT, env.get(ENV_STRICT))
            if env_strict is not None:
                options["strict"] = env_strict
        if "check_replays" not in options:
            env_check = parse_bool_setting(ENV_CHECK_REPLAYS, env.get(ENV_CHECK_REPLAYS))
            if env_check is not None:
                options["check_replays"] = env_check
        for name in ("strict", "report", "debug_graph_addresses", "check_replays", "fast_math"):
            if name in options and not isinstance(options[name], bool):
                raise TypeError(f"kunlun backend: option {name!r} must be a bool, got {options[name]!r}")
        if "graph_mode" in options and options["graph_mode"] not in GRAPH_MODES:
            raise ValueError(f"kunlun backend: graph_mode must be one of {list(GRAPH_MODES)}, "
                             f"got {options['graph_mode']!r}")
        if "capture_sizes" in options:
            sizes = options["capture_sizes"]
            if (not isinstance(sizes, (list, tuple)) or not sizes
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)):
                raise ValueError(f"kunlun backend: capture_sizes must be a non-empty list of positive ints, "
                                 f"got {sizes!r}")
            options["capture_sizes"] = tuple(sorted(set(sizes)))
        if "target" in options:
            from .lowering.targets import get_target

            get_target(options["target"])  # unknown names raise, listing the targets
        if options.get("dump_dir") is not None and not isinstance(options["dump_dir"], str):
            raise TypeError(f"kunlun backend: dump_dir must be a path string, got {options['dump_dir']!r}")
        if "splitting_ops" in options:
            options["splitting_ops"] = _as_name_tuple(options["splitting_ops"])
            _check_splitting_ops(options["splitting_ops"])
        if "max_captures_per_piece" in options and (not isinstance(options["max_captures_per_piece"], int)
                                                    or options["max_captures_per_piece"] < 1):
            raise ValueError("kunlun backend: max_captures_per_piece must be an int >= 1")
        return cls(**options)

    def replace(self, **changes: Any) -> "CompileConfig":
        return dataclasses.replace(self, **changes)

    def is_enabled(self, pass_name: str) -> bool:
        return pass_name not in self.disable

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_name_tuple(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple, set, frozenset)):
        if not all(isinstance(v, str) for v in value):
            raise TypeError(f"kunlun backend: expected a list of names, got {value!r}")
        return tuple(value)
    raise TypeError(f"kunlun backend: expected a list of names or a comma-separated string, got {value!r}")


# Spellings an on/off environment variable accepts (any case); anything else is an error.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool_setting(name: str, value: Optional[str]) -> Optional[bool]:
    """An on/off environment variable: 1/0, true/false, yes/no, on/off in any case; None when unset
    or empty.  Anything else is an error: a misspelt "no" must not turn a feature on."""
    if value is None or not value.strip():
        return None
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"kunlun backend: {name}={value!r} is not an on/off value; use one of "
                     f"{'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)} (any case)")


def _check_splitting_ops(names: Tuple[str, ...]) -> None:
    """Each name must be an op the runtime already splits at, or resolve through torch.ops, so that a
    typo is an error rather than a split that silently never happens."""
    from .runtime.splitting import ATTENTION_OPS, HOST_SYNC_OPS

    known = ATTENTION_OPS + HOST_SYNC_OPS
    unknown = [n for n in names if n not in known and not _is_registered_op(n)]
    if not unknown:
        return
    import difflib

    hints = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
    described = ", ".join(f"{n!r}" + (f" (did you mean {hints[n][0]!r}?)" if hints[n] else "") for n in unknown)
    raise ValueError(f"kunlun backend: unknown splitting_ops {described}; give registered ops as 'namespace::op' "
                     f"(or 'namespace::op.overload'); known splitting ops are {list(known)}")


def _is_registered_op(name: str) -> bool:
    """'ns::op' or 'ns::op.overload' that resolves through torch.ops.ns.op[.overload]."""
    namespace, sep, rest = name.partition("::")
    if not sep or not namespace or not rest:
        return False
    op_name, _, overload = rest.partition(".")
    import torch

    try:
        packet = getattr(getattr(torch.ops, namespace), op_name)
        if overload:
            getattr(packet, overload)
    except (AttributeError, RuntimeError):
        return False
    return True
