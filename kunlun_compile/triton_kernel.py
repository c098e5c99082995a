"""Triton kernels that run compiled on CUDA and interpreted on the CPU.

`triton.jit` decides at decoration time whether a function is compiled or
interpreted, so a module-level kernel could only do one.  A `Kernel` keeps
both forms and picks by the device of the tensors at each call: the same
kernel code serves the GPU and the CPU tests.

On the CPU the kernels run only when TRITON_INTERPRET=1 was set before triton
was imported (triton's own library functions such as `tl.sum` are only
interpretable then); otherwise the ops run their plain-torch reference.

Kernels compute in fp32 only, casting at loads and stores: the interpreter
gets arithmetic directly on bf16 values wrong, and on the GPU fp32 arithmetic
with one rounding per torch op is what reproduces torch's results.

Programmatic dependent launch (PDL): a kernel that declares a `PDL` constexpr
and starts with `wait_for_producers(PDL)` is launched on CUDA with
`launch_pdl=True`, so it is scheduled while the kernel before it finishes and
waits (griddepcontrol.wait) until that kernel's writes are visible.  Inside a
CUDA graph of a decode step, which is a chain of short dependent kernels, that
hides part of each launch: H100, 64 chained one-program kernels, 1.31 -> 1.05
µs per launch; 256 programs, 1.96 -> 1.48 (benchmarks/pdl_probe.py,
benchmarks/NOTES.md v10).  The wait returns at once when there is no
programmatic dependency (the kernel before is cuBLAS, a copy, or none).
KUNLUN_COMPILE_PDL=0 turns it off (launches as plain kernels, for comparison).

This module is at the bottom of the package's layers, beside config.py: lowering/
(generated kernels), ops/ and the built-in models' attention all launch through it.

`compiling_only(executor)`: inside, a CUDA launch compiles its kernel on the
executor (Triton's AsyncCompileMode) and does not run it — the outputs hold
garbage — so one walk over a graph's ops compiles all their kernels in
parallel (runtime/precompile.py); leaving the block waits for the compiles,
then loads the kernels and builds their launchers (a host C compile per
argument signature, otherwise done serially at each first launch) on the
executor as well.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Callable

import torch
import triton
import triton.language as tl

from .config import ENV_PDL, env_setting


def pdl_enabled() -> bool:
    """KUNLUN_COMPILE_PDL, read at each launch."""
    return env_setting(ENV_PDL)


@triton.jit
def wait_for_producers(PDL: tl.constexpr):
    """The first statement of a kernel that declares `PDL`: wait for the kernel before it (PDL launch)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


class Kernel:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = fn.__name__
        self._compiled = None
        self._interpreted = None
        self.pdl = "PDL" in inspect.signature(fn).parameters

    def on(self, device: torch.device):
        """The launchable kernel for `device`: `.on(device)[grid](*args, **constexprs)`."""
        fn = self._interpreted_fn() if device.type == "cpu" else self._compiled_fn()
        collected = _compiling_only.get()
        if device.type == "cuda" and collected is not None:
            fn = _CompileOnly(fn, collected)
        if not self.pdl:
            return fn
        return _PDLLauncher(fn, device.type == "cuda" and pdl_enabled())

    def _interpreted_fn(self):
        if not interpreter_usable():
            raise RuntimeError("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def _compiled_fn(self):
        if self._compiled is None:
            self._compiled = triton.JITFunction(self.fn)
        return self._compiled


# inside `compiling_only`: the kernels its launches compiled (or found compiled)
_compiling_only = contextvars.ContextVar("kunlun_compiling_only", default=None)


@contextlib.contextmanager
def compiling_only(executor):
    """CUDA launches inside compile their kernels on `executor` and skip running them; on leaving, every
    compile has finished and its kernel is loaded, launcher built (failed ones are dropped: the kernel
    compiles again at its real launch)."""
    from triton.runtime._async_compile import AsyncCompileMode, FutureKernel

    compiled: list = []
    with AsyncCompileMode(executor, ignore_errors=True):
        token = _compiling_only.set(compiled)
        try:
            yield
        finally:
            _compiling_only.reset(token)
    # one load per kernel (a kernel several calls share appears once per call; two threads must not load it)
    kernels = {id(k): k for k in (k.kernel if isinstance(k, FutureKernel) else k for k in compiled) if k is not None}
    list(executor.map(_load, kernels.values()))


def _load(kernel) -> None:
    try:
        kernel._init_handles()  # module load + launcher build; idempotent, else done at the first launch
    except Exception:  # noqa: BLE001 - the first launch does it (and reports any error) instead
        pass


class _CompileOnly:
    """`[grid](...)` that compiles the specialization a launch with these arguments would use, and stops."""

    def __init__(self, fn, collected: list):
        self.fn, self.collected = fn, collected

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            kernel = self.fn.run(*args, grid=grid, warmup=True, **kwargs)
            if kernel is not None:
                self.collected.append(kernel)
        return compile_only


class _PDLLauncher:
    """`[grid](...)` with the kernel's PDL constexpr (and the launch attribute when on) filled in."""

    def __init__(self, fn, on: bool):
        self.fn, self.on = fn, on

    def __getitem__(self, grid):
        launch = self.fn[grid]
        return functools.partial(launch, PDL=True, launch_pdl=True) if self.on else functools.partial(launch, PDL=False)


# Names of the kunlun:: ops' kernels, so a profile can tell them from ATen's and generated ones.
FUSED_KERNEL_NAMES: set = set()


def kernel(fn: Callable) -> Kernel:
    if fn.__module__.startswith("kunlun_compile.ops"):  # not the built-in models' own attention kernel
        FUSED_KERNEL_NAMES.add(fn.__name__)
    return Kernel(fn)


def interpreter_usable() -> bool:
    """True when triton was imported under TRITON_INTERPRET=1 (its library is interpretable)."""
    import triton.language as tl

    return not isinstance(tl.sum, triton.JITFunction)


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA; on the CPU only under the interpreter (else the torch reference runs)."""
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and bool(triton.knobs.runtime.interpret) and interpreter_usable()


def contiguous_results(out):
    """An op's torch-reference results laid out as its fake says (contiguous): element-wise torch ops
    follow their input's layout, and a graph traced with the fake must fit whichever path ran."""
    if isinstance(out, tuple):
        return tuple(t.contiguous() for t in out)
    return out.contiguous()


@contextlib.contextmanager
def cpu_kernels(enabled: bool):
    """Choose, for the duration, whether ops on CPU tensors run their Triton kernels
    (interpreted; needs TRITON_INTERPRET=1 at start-up) or their torch reference."""
    if enabled and not interpreter_usable():
        raise RuntimeError("cpu_kernels(True) needs TRITON_INTERPRET=1 set before triton is imported")
    old = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = enabled
    try:
        yield
    finally:
        triton.knobs.runtime.interpret = old
