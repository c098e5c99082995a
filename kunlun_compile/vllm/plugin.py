"""The `vllm.general_plugins` entry point: makes backend="kunlun" work in vLLM.

vLLM calls `register()` in every process it starts.  It wraps four vLLM
functions, each change applying only when the compilation config names
backend "kunlun" (every other backend runs vLLM's code untouched):

1. `make_compiler` (mode 3): returns `KunlunCompilerInterface` instead of the
   platform's compile backend; and `CompilationConfig.__post_init__`, whose mode-3
   check refuses every backend but eager/inductor, accepts "kunlun".
2. `CompilationConfig.init_backend` (modes 1-2): returns this backend configured
   with the options in the config (options.py), not the bare "kunlun" string.
3. The platform's `check_and_update_config`: vLLM's CPU platform turns mode 3
   into mode 2 with backend "inductor" (a shortcut for its CI); a user who asked
   for mode 3 with kunlun keeps it.
4. `VllmConfig.__post_init__`: like inductor, this backend compiles vLLM's
   native PyTorch code, so custom ops default to "none" (vLLM enables all of
   them for unknown backends, hiding RMSNorm, RoPE and the MoE gate from the
   passes in opaque kernels); and vLLM's AOT artifact path, which only knows
   inductor's serialized output, is turned off for this backend
   (VLLM_USE_AOT_COMPILE=0, as vLLM itself does for batch-invariant mode)
   unless the user set it.

It also publishes `kunlun_compile.vllm_fusion_pass` for vLLM's
`inductor_passes` (fusion_pass.py).
"""
from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys

from .compat import missing_hooks, unsupported_message

BACKEND = "kunlun"
logger = logging.getLogger("kunlun_compile.vllm")
_installed = False
_early_installed = False


def _is_kunlun(compilation_config) -> bool:
    return getattr(compilation_config, "backend", None) == BACKEND


def register() -> None:
    """Entry point; safe to call more than once."""
    global _installed
    if _installed:
        return
    missing = missing_hooks()
    if missing:
        _install_refusal(unsupported_message(missing))
        return
    _wrap_make_compiler()
    _install_early()
    _wrap_init_backend()
    _wrap_platform_config()
    _wrap_vllm_config_defaults()
    _installed = True


def register_early() -> None:
    """The `vllm.platform_plugins` entry: claims no platform (returns None) and only lets
    CompilationConfig accept mode 3 with "kunlun".  `LLM(compilation_config={...})` builds its
    CompilationConfig before vLLM loads general plugins; platform plugins are probed earlier, when
    vLLM first resolves its platform -- from inside `vllm/config/compilation.py`'s own import, so
    the patch waits for that module to finish (`_WhenConfigReady`)."""
    if _early_installed:
        return None
    module = sys.modules.get(_CONFIG_MODULE)
    if module is not None and hasattr(module, "CompilationConfig"):
        _install_early()
    elif not any(isinstance(f, _WhenConfigReady) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenConfigReady())
    return None


_CONFIG_MODULE = "vllm.config.compilation"


class _WhenConfigReady(importlib.abc.MetaPathFinder):
    """Finds nothing; at the first import after `vllm.config.compilation` is complete, patches it
    and removes itself."""

    def find_spec(self, fullname, path, target=None):
        module = sys.modules.get(_CONFIG_MODULE)
        if module is not None and hasattr(module, "CompilationConfig"):
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
            _install_early()
        return None


def _install_early() -> None:
    global _early_installed
    if not _early_installed and not missing_hooks((_CONFIG_MODULE, "CompilationConfig.__post_init__")):
        _early_installed = True
        _wrap_mode3_validation()
        try:  # `inductor_passes` names are resolved when the config is built, also before general plugins
            _publish_fusion_pass()
        except Exception as e:  # noqa: BLE001 - never break vLLM's import over the optional pass
            logger.warning("kunlun_compile: the fusion pass for vLLM's inductor_passes is unavailable: %s", e)


def _install_refusal(message: str) -> None:
    """On a vLLM without our hooks, selecting backend="kunlun" raises `message`; nothing else changes."""
    logger.warning(message)
    try:
        from vllm.config.compilation import CompilationConfig
    except Exception:  # noqa: BLE001 - nothing to hook into; the warning above is all we can do
        return
    original = getattr(CompilationConfig, "__post_init__", None)
    if original is None:
        return
    from .compat import UnsupportedVllmError

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        if _is_kunlun(self):
            raise UnsupportedVllmError(message)
        return original(self, *args, **kwargs)

    CompilationConfig.__post_init__ = __post_init__


def _wrap_make_compiler() -> None:
    from vllm.compilation import backends

    original = backends.make_compiler

    @functools.wraps(original)
    def make_compiler(compilation_config):
        if _is_kunlun(compilation_config):
            from .compiler import KunlunCompilerInterface

            return KunlunCompilerInterface()
        return original(compilation_config)

    backends.make_compiler = make_compiler


def _wrap_mode3_validation() -> None:
    """vLLM 0.32's `CompilationConfig.__post_init__` refuses any backend but eager/inductor in mode 3
    ("custom backends are not supported for piecewise compilation") although `make_compiler` has a
    path for them; the check is the only use of the name there, so it runs with "eager" standing in."""
    from vllm.config.compilation import CompilationConfig, CompilationMode

    original = CompilationConfig.__post_init__

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        if not (_is_kunlun(self) and self.mode == CompilationMode.VLLM_COMPILE):
            return original(self, *args, **kwargs)
        self.backend = "eager"
        try:
            return original(self, *args, **kwargs)
        finally:
            self.backend = BACKEND

    CompilationConfig.__post_init__ = __post_init__


def _wrap_init_backend() -> None:
    from vllm.config.compilation import CompilationConfig, CompilationMode

    original = CompilationConfig.init_backend

    @functools.wraps(original)
    def init_backend(self, vllm_config, *args, **kwargs):
        if _is_kunlun(self) and self.mode in (CompilationMode.STOCK_TORCH_COMPILE,
                                                CompilationMode.DYNAMO_TRACE_ONCE):
            from ..backend import shared_backend
            from .options import config_from_vllm

            return shared_backend(config_from_vllm(self.inductor_compile_config))
        return original(self, vllm_config, *args, **kwargs)

    CompilationConfig.init_backend = init_backend


def _wrap_platform_config() -> None:
    from vllm.config.compilation import CompilationMode
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config  # a classmethod, bound to the class

    def check_and_update_config(cls, vllm_config):
        cc = vllm_config.compilation_config
        keep_mode3 = _is_kunlun(cc) and cc.mode == CompilationMode.VLLM_COMPILE
        original(vllm_config)
        if keep_mode3 and cc.mode == CompilationMode.DYNAMO_TRACE_ONCE and cc.backend != BACKEND:
            logger.info("kunlun_compile: keeping compilation mode 3 with backend 'kunlun' (the %s platform "
                        "switches mode 3 to mode 2 with %r)", platform_cls.__name__, cc.backend)
            cc.mode = CompilationMode.VLLM_COMPILE
            cc.backend = BACKEND

    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _wrap_vllm_config_defaults() -> None:
    from vllm.config.vllm import VllmConfig

    original = VllmConfig.__post_init__

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        cc = self.compilation_config
        if _is_kunlun(cc):
            if not any(base in cc.custom_ops for base in ("all", "none")):
                cc.custom_ops.append("none")
            # vLLM's own variable, which vLLM reads from the environment: set there, not through
            # kunlun_compile/config.py (which holds only the KUNLUN_COMPILE_* variables)
            if "VLLM_USE_AOT_COMPILE" not in os.environ:
                os.environ["VLLM_USE_AOT_COMPILE"] = "0"
        result = original(self, *args, **kwargs)
        if _is_kunlun(cc) and cc.compile_sizes is None:
            # platforms without static graphs (CPU) never size their compile ranges; mode 3's piecewise
            # backend needs the (empty) list of specific sizes
            cc.post_init_cudagraph_sizes()
        return result

    VllmConfig.__post_init__ = __post_init__


def _publish_fusion_pass() -> None:
    """vLLM resolves `inductor_passes` qualnames as `__import__(module).__dict__[name]`, i.e. in the
    top-level package; hence `kunlun_compile.vllm_fusion_pass`, set here where vLLM is importable."""
    import kunlun_compile

    from .fusion_pass import KunlunFusionPass

    kunlun_compile.vllm_fusion_pass = KunlunFusionPass()
