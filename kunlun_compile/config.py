"""One frozen configuration object, built once per backend and passed down; and the one place
the package's environment variables are read.

Every option the backend understands is a field of `CompileConfig`.  Options reach it from
`torch.compile(..., options={...})`, from `kunlun_compile.backend(**options)` and from
environment variables; unknown names are an error that lists the valid ones, so a typo never
silently turns a feature off.

Every `KUNLUN_COMPILE_*` variable is an `EnvVar` of `ENV_VARS` (name, the option it fills or
the process-wide setting it is, parser, help) and is read through `env_setting`; no other module
reads or writes `os.environ` for them.  Variables with an option are read when a config is built
(never mid-compile); the process-wide settings are read where they act (see each one's help).
vLLM's own variables (VLLM_*, XDG_CACHE_HOME) are not ours: vllm/ reads and sets those itself.

This module is at the bottom of the package's layers (see kunlun_compile/__init__.py): it imports
nothing of the package, so the lists it checks options against (lowering targets, the runtime's
splitting ops) are defined here and imported by lowering/targets.py and runtime/splitting.py.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

GRAPH_MODES = ("auto", "none", "piecewise", "full", "full_and_piecewise")
# vLLM's default capture sizes: 1, 2, 4, then every 8 up to 512
DEFAULT_CAPTURE_SIZES = (1, 2, 4) + tuple(range(8, 513, 8))
# Names of the lowering targets (lowering/targets.py describes each; it checks that it has exactly these).
TARGET_NAMES = ("cuda", "kunlun-xpu")

# The ops the graph runtime always splits at (runtime/splitting.py); `splitting_ops` adds to them.
# Attention ops by qualified name: the built-in models', vLLM's, and PyTorch's own.
ATTENTION_OPS = (
    "kunlun_models::attention",
    "vllm::unified_attention",
    "vllm::unified_attention_with_output",
    "vllm::unified_mla_attention",
    "vllm::unified_mla_attention_with_output",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward",
)
# Ops whose result the host must see (a capture would bake in one value or fail).
HOST_SYNC_OPS = (
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
    "aten::_unique2", "aten::unique_consecutive", "aten::item", "aten::equal", "aten::is_nonzero",
    "aten::repeat_interleave.Tensor", "aten::_assert_async", "aten::_assert_async.msg",
)


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """Every option of the kunlun backend."""

    # Raise on any failure in a pass, lowering or runtime step instead of
    # warning once and running that graph without the failing step.
    strict: bool = False
    # Names of passes to skip (see `kunlun-compile passes`).
    disable: Tuple[str, ...] = ()
    # False: every fusion pass off, the generic lowering alone (to measure it; CLI `--no-fusion`).
    fusion: bool = True
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
    # see capture/record.py); None: the environment variable decides, read at each compile.
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
        disable = _as_name_tuple(options.pop("disable", ()))
        for var in ENV_VARS:
            if var.option is None:
                continue
            value = env_setting(var.name, environ)
            if var.option == "disable":  # merged: turning a pass off from the shell works whatever the code says
                options["disable"] = tuple(dict.fromkeys(disable + value))
            elif var.option not in options and value is not None:
                options[var.option] = value
        for name in ("strict", "report", "debug_graph_addresses", "check_replays", "fast_math", "fusion"):
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
        if "target" in options and options["target"] not in TARGET_NAMES:
            raise ValueError(f"unknown lowering target {options['target']!r}; targets are {sorted(TARGET_NAMES)}")
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


def _parse_names(name: str, text: str) -> Tuple[str, ...]:
    return _as_name_tuple(text)


def _parse_path(name: str, text: str) -> str:
    return text


def _parse_count(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"kunlun backend: {name}={text!r} is not a count (a non-negative integer)")
    return value


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One `KUNLUN_COMPILE_*` environment variable."""

    name: str
    # (name, text) -> value, for a set, non-empty variable; raises ValueError naming the variable
    parse: Callable[[str, str], Any]
    help: str
    # The CompileConfig option it fills when the code does not set that option (read when a config
    # is built); None: a process-wide setting, read where it acts.
    option: Optional[str] = None
    # The value while unset or empty (a callable: computed at the read).
    default: Any = None


ENV_DISABLE = "KUNLUN_COMPILE_DISABLE"
ENV_STRICT = "KUNLUN_COMPILE_STRICT"
ENV_CHECK_REPLAYS = "KUNLUN_COMPILE_CHECK_REPLAYS"
ENV_DUMP = "KUNLUN_COMPILE_DUMP"
ENV_CACHE_DIR = "KUNLUN_COMPILE_CACHE_DIR"
ENV_JIT_WORKERS = "KUNLUN_COMPILE_JIT_WORKERS"
ENV_PDL = "KUNLUN_COMPILE_PDL"
ENV_CHECK_INDICES = "KUNLUN_COMPILE_CHECK_INDICES"
ENV_PATTERN_CACHE = "KUNLUN_COMPILE_PATTERN_CACHE"

ENV_VARS: Tuple[EnvVar, ...] = (
    EnvVar(ENV_DISABLE, _parse_names, "comma-separated pass names to skip (merged with the `disable` option)",
           option="disable", default=()),
    EnvVar(ENV_STRICT, parse_bool_setting, "on: raise instead of falling back (unless the code sets `strict`)",
           option="strict"),
    EnvVar(ENV_CHECK_REPLAYS, parse_bool_setting,
           "on: the graph runtime's replay checker (unless the code sets `check_replays`; runtime/checking.py)",
           option="check_replays"),
    EnvVar(ENV_DUMP, _parse_path, "record every graph the backend receives under this directory, read at each "
           "compile (the `dump_dir` option wins; capture/record.py)"),
    EnvVar(ENV_CACHE_DIR, _parse_path, "where generated kernels are cached, read at each kernel; default "
           "~/.cache/kunlun_compile, under vLLM next to vLLM's cache (lowering/cache.py)"),
    EnvVar(ENV_JIT_WORKERS, _parse_count, "threads that compile a graph's fused kernels ahead of its first run at "
           "a size, read at each run (CUDA; below 2: each kernel compiles at its first launch; "
           "runtime/precompile.py)", default=lambda: min(16, os.cpu_count() or 1)),
    EnvVar(ENV_PDL, parse_bool_setting, "off: launch the fused kernels without programmatic dependent launch, "
           "read at each launch (triton_kernel.py)", default=True),
    EnvVar(ENV_CHECK_INDICES, parse_bool_setting, "on: check index inputs on the host also on CUDA (one sync per "
           "call), read once at import (ops/index_checks.py)", default=False),
    EnvVar(ENV_PATTERN_CACHE, parse_bool_setting, "off: keep traced rule patterns in memory only, not under the "
           "cache directory, read at each pattern (passes/pattern_cache.py)", default=True),
)
_ENV_BY_NAME: Dict[str, EnvVar] = {v.name: v for v in ENV_VARS}


def env_setting(name: str, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The value of the `KUNLUN_COMPILE_*` variable `name` in `environ` (default: the process
    environment, read now), parsed; its default while unset or empty.  The one place the package
    reads its environment variables."""
    var = _ENV_BY_NAME[name]  # a KeyError here is a variable missing from ENV_VARS
    text = (os.environ if environ is None else environ).get(name)
    if text is None or not text.strip():
        return var.default() if callable(var.default) else var.default
    return var.parse(name, text)


def _check_splitting_ops(names: Tuple[str, ...]) -> None:
    """Each name must be an op the runtime already splits at, or resolve through torch.ops, so that a
    typo is an error rather than a split that silently never happens."""
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
