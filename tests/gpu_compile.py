"""Compiling the kernels for an NVIDIA GPU on a machine that has none.

The interpreter runs a kernel's Python and never Triton's compiler, so a kernel can pass every CPU test and
still fail to compile on the GPU (a constexpr used as a value, a type the code generator rejects).  Triton
compiles without a GPU: its code generator and the ptxas it ships run on the CPU.  So launches made under the
interpreter are recorded as specs (the kernel, each argument's type as a real launch would mangle it, the
constexprs' values, warps and stages), and a process without TRITON_INTERPRET (under it, triton's own library
functions are not compilable) compiles each spec for Hopper (sm_90) down to a cubin, and checks its shared
memory fits a Hopper block (a launch over it is the other failure a GPU would show first).

    with recording_launches() as specs, cpu_kernels(True):
        ...  # interpreted launches
    failures = compile_for_gpu(specs)   # [] when every one compiled

A whole test run can be recorded too (tests/conftest.py): KUNLUN_COMPILE_RECORD_LAUNCHES=specs.json pytest ...,
then `python -m tests.gpu_compile < specs.json` prints the failures as JSON.

Integer arguments are compiled as the launcher would type them, without its value specialisations (1, and
divisibility by 16): those change the generated code's constants, not what compiles.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List

TARGET = ("cuda", 90, 32)  # Hopper: the machines the benchmarks run on
# The most shared memory one block may use on Hopper (227 KiB): a kernel compiled over it fails only at its
# launch ("out of resource: shared memory"), which a compile-only check would otherwise miss.
SHARED_MEMORY_LIMIT = 227 * 1024
_PLAIN = (bool, int, float, str, type(None))


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def spec_of(kernel, args, kwargs) -> dict:
    from triton.runtime.jit import mangle_type

    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    bound.setdefault("PDL", False)
    entries = []
    for name, p in params.items():
        value = bound.get(name, p.default)
        if _is_constexpr(p) or value is None:
            if not isinstance(value, _PLAIN):
                raise TypeError(f"{kernel.__name__}: constexpr {name} = {value!r} is not recordable")
            entries.append([name, "constexpr", value])
        else:
            entries.append([name, mangle_type(value), None])
    return {"module": kernel.fn.__module__, "file": inspect.getsourcefile(kernel.fn), "name": kernel.fn.__name__,
            "args": entries, "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}}


class _Recording:
    def __init__(self, kernel, launcher, specs: list):
        self.kernel, self.launcher, self.specs = kernel, launcher, specs

    def __getitem__(self, grid):
        launch = self.launcher[grid]

        def run(*args, **kwargs):
            self.specs.append(spec_of(self.kernel, args, kwargs))
            return launch(*args, **kwargs)
        return run


@contextlib.contextmanager
def recording_launches() -> Iterator[List[dict]]:
    """Every Kernel launch inside is recorded (and still runs)."""
    from kunlun_compile.triton_kernel import Kernel

    specs: List[dict] = []
    real_on = Kernel.on
    Kernel.on = lambda self, device: _Recording(self, real_on(self, device), specs)
    try:
        yield specs
    finally:
        Kernel.on = real_on


def unique(specs: List[dict]) -> List[dict]:
    seen = {}
    for s in specs:
        seen.setdefault(json.dumps(s, sort_keys=True), s)
    return list(seen.values())


def compile_for_gpu(specs: List[dict], timeout: float = 1200) -> List[str]:
    """Compile each distinct spec in a fresh process without the interpreter; the failures, one line each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.gpu_compile"], input=json.dumps(unique(specs)),
                          capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        return [f"the compiling process failed ({done.returncode}): {done.stderr[-3000:]}"]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _module(spec: dict):
    try:
        return importlib.import_module(spec["module"])
    except ImportError:  # a generated kernel's module: load its file
        loader = importlib.util.spec_from_file_location(spec["module"], spec["file"])
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return module


def _jit(obj):
    import triton

    if hasattr(obj, "_compiled_fn"):  # a Kernel
        return obj._compiled_fn()
    return obj if isinstance(obj, triton.JITFunction) else triton.JITFunction(obj)


def _variants(spec: dict) -> List[tuple]:
    """(name, jit function) to compile for the spec: the kernel launched or, where the CPU launched a generated
    kernel's portable form (lowering/: it calls the interpreter's own helpers, `interp_math.to_bf16`), the CUDA
    form the GPU launches with the same arguments."""
    module = _module(spec)
    name = spec["name"]
    if "portable" in name and hasattr(module, name.replace("portable", "cuda")):
        name = name.replace("portable", "cuda")
    return [(name, _jit(getattr(module, name)))]


def _compile_one(spec: dict) -> List[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: kind for name, kind, _ in spec["args"]}
    constexprs = {(i,): value for i, (_, kind, value) in enumerate(spec["args"]) if kind == "constexpr"}
    shown = {n: v for n, kind, v in spec["args"] if kind == "constexpr"}
    failures = []
    try:
        variants = _variants(spec)
    except Exception as e:  # noqa: BLE001 - reported with the spec
        return [f"{spec['name']}: cannot load ({type(e).__name__}: {e})"]
    for name, fn in variants:
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(*TARGET),
                                      options=spec["options"])
        except Exception as e:  # noqa: BLE001 - every failure is reported, with the spec that caused it
            failures.append(f"{name} {shown} {spec['options']}: {type(e).__name__}: {str(e)[:1500]}")
            continue
        if compiled.metadata.shared > SHARED_MEMORY_LIMIT:
            failures.append(f"{name} {shown} {spec['options']}: needs {compiled.metadata.shared} bytes of shared "
                            f"memory, over Hopper's {SHARED_MEMORY_LIMIT} per block")
    return failures


def main() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = json.loads(sys.stdin.read())
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        failures = [line for lines in pool.map(_compile_one, specs) for line in lines]
    print(json.dumps(failures))


if __name__ == "__main__":
    main()
