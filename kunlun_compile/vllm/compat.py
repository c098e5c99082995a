"""Which vLLM versions the integration supports, and the hooks it relies on.

The integration patches four vLLM functions (see plugin.py).  A vLLM that
lacks one of them would silently compile with something else, so its absence
is a clear error naming the supported versions.
"""
from __future__ import annotations

import importlib
from typing import List, Tuple

# Versions the integration was tested against (tests/test_vllm.py installs the first).
TESTED_VERSIONS = ("0.32.0",)
SUPPORTED = "vLLM 0.32.x"

# (module, attribute path): what plugin.py wraps or calls.
REQUIRED_HOOKS = (
    ("vllm.compilation.backends", "make_compiler"),
    ("vllm.compilation.compiler_interface", "CompilerInterface"),
    ("vllm.config.compilation", "CompilationConfig.init_backend"),
    ("vllm.config.vllm", "VllmConfig.__post_init__"),
    ("vllm.config.compilation", "CompilationConfig.__post_init__"),
    ("vllm.platforms", "current_platform"),
    ("vllm.config.utils", "Range"),
)


class UnsupportedVllmError(RuntimeError):
    """This vLLM lacks a hook the kunlun integration needs."""


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - any import failure means "no usable vLLM"
        return "not importable"


def missing_hooks(*hooks: Tuple[str, str]) -> List[str]:
    """The required hooks (or those given) this vLLM does not have, as 'module:attr' strings."""
    missing = []
    for module_name, path in hooks or REQUIRED_HOOKS:
        try:
            obj = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - any failure to reach the hook means it is missing
            missing.append(f"{module_name}:{path}")
    return missing


def unsupported_message(missing: List[str]) -> str:
    return (f"kunlun_compile: backend='kunlun' needs {SUPPORTED} (tested: {', '.join(TESTED_VERSIONS)}); "
            f"the installed vLLM {vllm_version()} lacks {', '.join(missing)}. Install a supported vLLM, "
            "or use backend='inductor' with the kunlun fusion pass, or torch.compile(backend='kunlun') directly.")


def require_supported_vllm() -> None:
    missing = missing_hooks()
    if missing:
        raise UnsupportedVllmError(unsupported_message(missing))
