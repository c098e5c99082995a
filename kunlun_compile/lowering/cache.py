"""Generated kernels: registry, on-disk cache, loading and launching.

A kernel is known by its key (a hash of its KIR).  `register` records the KIR
in memory and on disk, so a graph that names the key can run in a later
process; `kernel_for` generates the Triton source once per key and codegen
version, runs it and wraps it in a launcher.  Triton caches the compiled
binaries by source, so a warm disk cache skips both code generation and
compilation.

Directory: $KUNLUN_COMPILE_CACHE_DIR, else the process's default (`set_default_cache_dir`;
the vLLM integration puts it next to vLLM's cache), else ~/.cache/kunlun_compile, subfolder
`pointwise/`.  If that is not writable: `<tmpdir>/kunlun_compile_<uid>/pointwise`,
created owner-only and refused when another user owns it or group/others may
write to it (then the kernels live in memory only, with one warning).

Entries (ENTRY_FORMAT in the names, so entries of another layout are never read):
- `<key>_e<F>.json`: `{"format", "sha256", "kir"}`; valid when the hash matches and
  the KIR hashes to `<key>` again;
- `<key>_v<codegen>_e<F>.py`: a first line `# kunlun_compile entry <F> sha256 <hex>`
  over the format, the KIR and the source below it.
An entry that fails its check (edited, truncated, empty, from another version) is a
miss: regenerated and overwritten, with one warning naming the file.  The hashes
catch corruption and stale or edited files; they are no signature (whoever can write
the directory can recompute them), which is why the fallback directory's owner
and mode are checked.  Writes go to a temporary file unique to the process and
thread, then `os.replace`, so concurrent writers of one key all succeed.
"""
from __future__ import annotations

import collections
import hashlib
import json
import linecache
import os
import secrets
import stat
import tempfile
import threading
import types
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import triton

from ..config import ENV_CACHE_DIR, env_setting
from ..triton_kernel import Kernel
from .codegen import CODEGEN_VERSION, broadcast_strides, coalesce, generate, indexed_input_ranks
from .interpret import allocate_outputs
from .kir import KernelIR
from .row_codegen import generate_row
from .row_kernel import RowKernel

ENTRY_FORMAT = 1  # bump when an entry's layout or hash changes
BLOCK = 1024
NUM_WARPS = 4
# enable_fp_fusion=False at every launch: LLVM would contract `a * b + c` into one fma, one rounding
# where eager rounds twice (HF's `q * cos + rotate_half(q) * sin` moved by an ulp); the KIR's own `fma`
# instructions are explicit and stay fused
_INT32_LIMIT = 2**31 - 1

_registry: Dict[str, KernelIR] = {}
_kernels: Dict[str, "GeneratedKernel"] = {}
_kir_on_disk: Set[Tuple[str, str]] = set()  # (directory, key) whose KIR entry was checked or written here
stats = collections.Counter()  # generated / read_from_disk / kir_from_disk / rejected_entries


class KernelCacheWarning(UserWarning):
    """A cache entry was rejected, or no safe cache directory was found."""


_warned: Set[str] = set()
_warned_lock = threading.Lock()


def warn_once(subject: str, message: str) -> None:
    with _warned_lock:
        if subject in _warned:
            return
        _warned.add(subject)
    warnings.warn(message, KernelCacheWarning, stacklevel=3)


# ---- the directory ------------------------------------------------------------------------------

_default_root: Optional[str] = None  # set_default_cache_dir


def set_default_cache_dir(directory: Optional[str]) -> None:
    """The cache directory of this process while KUNLUN_COMPILE_CACHE_DIR is unset (None: back to
    ~/.cache/kunlun_compile).  The vLLM integration sets it next to vLLM's cache of the model."""
    global _default_root
    _default_root = directory


def cache_dir() -> Optional[Path]:
    """The folder of generated-kernel entries, or None: no safe folder, kernels stay in memory."""
    return cache_subdir("pointwise")


def cache_subdir(name: str) -> Optional[Path]:
    """`name` under the cache root (also the traced-pattern cache's, passes/pattern_cache.py), with the
    same fallback; None when no safe folder exists."""
    root = Path(env_setting(ENV_CACHE_DIR) or _default_root or Path.home() / ".cache" / "kunlun_compile") / name
    return root if _writable(root) else _private_fallback(root, name)


def _private_fallback(root: Path, name: str) -> Optional[Path]:
    """<tmpdir>/kunlun_compile_<uid>/<name> if it is ours alone; else None, with one warning."""
    try:
        base = _private_dir(Path(tempfile.gettempdir()) / f"kunlun_compile_{os.getuid()}")
        return _private_dir(base / name)
    except OSError as e:
        warn_once(f"fallback:{root}", f"kunlun_compile: the cache {root} is not writable and the fallback "
                                      f"is not safe to use ({e}); its entries are kept in memory only")
        return None


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / ".writable").touch()
        return True
    except OSError:
        return False


def _private_dir(path: Path) -> Path:
    """`path`, created 0o700 if absent; OSError unless it is a real directory of ours that only we may write."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory (a symlink?)")
    if st.st_uid != os.getuid():
        raise OSError(f"{path} is owned by uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o022:
        raise OSError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
    return path


def kir_name(key: str) -> str:
    return f"{key}_e{ENTRY_FORMAT}.json"


def source_name(key: str) -> str:
    return f"{key}_v{CODEGEN_VERSION}_e{ENTRY_FORMAT}.py"


def source_path(key: str) -> Path:
    """Where the kernel's source is (or would be) cached; `<in memory: ...>` without a cache folder."""
    return _source_path_in(cache_dir(), key)


def _source_path_in(root: Optional[Path], key: str) -> Path:
    return root / source_name(key) if root is not None else Path(f"<in memory: {source_name(key)}>")


# ---- entries: what is written, and the check before anything is used -----------------------------

class _InvalidEntry(Exception):
    pass


def _sha256(*parts: str) -> str:
    h = hashlib.sha256(f"kunlun_compile entry {ENTRY_FORMAT}".encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


def _kir_entry(kir: KernelIR) -> str:
    payload = kir.to_json()
    text = json.dumps(payload, sort_keys=True)
    return json.dumps({"format": ENTRY_FORMAT, "sha256": _sha256(text), "kir": payload}, sort_keys=True)


def _kir_from_entry(text: str, key: str) -> KernelIR:
    try:
        entry = json.loads(text)
        payload = entry["kir"]
        ok = entry["format"] == ENTRY_FORMAT and entry["sha256"] == _sha256(json.dumps(payload, sort_keys=True))
    except (ValueError, KeyError, TypeError):
        raise _InvalidEntry("not a cache entry (truncated or corrupt)") from None
    if not ok:
        raise _InvalidEntry("content hash mismatch (edited or corrupt)")
    try:
        kir = KernelIR.from_json(payload)
    except (ValueError, KeyError, TypeError) as e:
        raise _InvalidEntry(f"not a valid kernel ({e})") from None
    if kir.key != key:  # the key is a hash of the KIR: an edited KIR cannot keep it
        raise _InvalidEntry(f"holds kernel {kir.key}, not {key}")
    return kir


_SOURCE_HEADER = "# kunlun_compile entry {format} sha256 {digest}\n"


def _source_entry(kir: KernelIR, source: str) -> str:
    return _SOURCE_HEADER.format(format=ENTRY_FORMAT, digest=_sha256(kir.canonical(), source)) + source


def _check_source_entry(text: str, kir: KernelIR) -> None:
    header, _, source = text.partition("\n")
    if header + "\n" != _SOURCE_HEADER.format(format=ENTRY_FORMAT, digest=_sha256(kir.canonical(), source)):
        raise _InvalidEntry("content hash mismatch (edited, truncated or empty)")


def _read_entry(path: Path) -> Optional[str]:
    """The file's text, None if absent; _InvalidEntry if unreadable."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise _InvalidEntry(f"unreadable ({e})") from None


def _reject(path: Path, why: _InvalidEntry, consequence: str) -> None:
    stats["rejected_entries"] += 1
    warn_once(f"entry:{path}", f"kunlun_compile: ignoring the cached kernel entry {path}: {why}; {consequence}")


def write_atomic(path: Path, text: str, what: str = "kernel cache entry") -> bool:
    """Write via a temporary file of this process and thread, then os.replace: readers see the old or
    the new file whole, and concurrent writers of one key each succeed (the last one stays)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        warn_once(f"write:{path}", f"kunlun_compile: could not write the {what} {path} ({e}); "
                                   f"using it from memory")
        return False


# ---- KIR: registry and disk ---------------------------------------------------------------------

def _read_kir(path: Path, key: str, consequence: str) -> Optional[KernelIR]:
    try:
        text = _read_entry(path)
        return None if text is None else _kir_from_entry(text, key)
    except _InvalidEntry as e:
        _reject(path, e, consequence)
        return None


def register(kir: KernelIR) -> str:
    key = kir.key
    _registry.setdefault(key, kir)
    root = cache_dir()
    if root is not None and (str(root), key) not in _kir_on_disk:
        path = root / kir_name(key)
        if _read_kir(path, key, "overwriting it") is None:
            write_atomic(path, _kir_entry(kir))
        _kir_on_disk.add((str(root), key))
    return key


def kir_for(key: str) -> KernelIR:
    if key not in _registry:
        root = cache_dir()
        path = root / kir_name(key) if root is not None else None
        kir = _read_kir(path, key, "recompile the model") if path is not None else None
        if kir is None:
            where = f"no valid entry at {path}" if path is not None else "no disk cache"
            raise KeyError(f"kunlun::pointwise: unknown generated kernel {key!r} (not compiled in this process, "
                           f"{where}); recompile the model")
        _registry.setdefault(key, kir)
        stats["kir_from_disk"] += 1
    return _registry[key]


# ---- source: cached or generated, then run from the checked text --------------------------------

def _source_for(key: str, kir: KernelIR) -> Tuple[str, Path]:
    """(the module text to run, its path): the cached entry if it checks out, else generated and written."""
    root = cache_dir()
    path = _source_path_in(root, key)
    if root is not None:
        try:
            text = _read_entry(path)
            if text is not None:
                _check_source_entry(text, kir)
                stats["read_from_disk"] += 1
                return text, path
        except _InvalidEntry as e:
            _reject(path, e, "regenerating it")
    text = _source_entry(kir, generate(kir) if kir.reduce_dim is None else generate_row(kir))
    stats["generated"] += 1
    if root is not None:
        write_atomic(path, text)
    return text, path


def _run_module(key: str, text: str, path: Path) -> types.ModuleType:
    """Executes the checked text itself (no second read of the file, no bytecode cache beside it).
    Triton reads a kernel's source through linecache: pin it there to this same text."""
    filename = str(path)
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)  # mtime None: kept
    module = types.ModuleType(f"kunlun_compile_generated.{key}")
    module.__file__ = filename
    exec(compile(text, filename, "exec"), module.__dict__)  # noqa: S102 - our generated, hash-checked code
    return module


def kernel_for(key: str):
    k = _kernels.get(key)
    if k is None:
        kir = kir_for(key)
        text, path = _source_for(key, kir)
        launcher = GeneratedKernel if kir.reduce_dim is None else RowKernel
        k = _kernels.setdefault(key, launcher(kir, _run_module(key, text, path), path))
    return k


class GeneratedKernel:
    """Launches one generated kernel: outputs allocated contiguous, inputs read through their strides."""

    def __init__(self, kir: KernelIR, module, path: Path):
        self.kir, self.path = kir, path
        self.rank = max(kir.rank, 1)
        self._cuda = Kernel(module.kernel_cuda)
        self._portable = Kernel(module.kernel_portable)
        self._indexed = list(indexed_input_ranks(kir))
        self._plain = kir.plain_inputs
        self._plans: Dict[tuple, tuple] = {}

    def _plan(self, inputs: Sequence[torch.Tensor], shape: Tuple[int, ...]) -> tuple:
        sig = (shape, tuple((x.shape, x.stride()) for x in inputs))
        plan = self._plans.get(sig)
        if plan is None:
            # an input not read by a plain load (read at index expressions, or a device anchor) has no
            # strides over the space
            strides = [broadcast_strides(x, self.rank) if k in self._plain else [0] * self.rank
                       for k, x in enumerate(inputs)]
            padded = (1,) * (self.rank - len(shape)) + tuple(shape)
            # an indexed kernel computes every coordinate: no dims merged
            sizes, sts = (list(padded), strides) if self.kir.indexed else coalesce(padded, strides)
            numel = 1
            for s in padded:
                numel *= s
            reach = max([numel] + [sum((n - 1) * abs(st) for n, st in zip(sizes, s)) for s in sts]
                        + [sum((n - 1) * abs(st) for n, st in zip(inputs[k].shape, inputs[k].stride()))
                           for k in self._indexed])
            rank = len(sizes)
            full_sizes = [1] * (self.rank - rank) + sizes
            full_strides = [[0] * (self.rank - rank) + s for s in sts]
            args = full_sizes[1:] + [st for s in full_strides for st in s]
            for k in self._indexed:  # raw strides, then sizes, of each input read at index expressions
                args += list(inputs[k].stride()) + list(inputs[k].shape)
            plan = self._plans[sig] = (numel, args, rank, reach > _INT32_LIMIT)
            if len(self._plans) > 256:  # many layouts: keep the newest
                self._plans.pop(next(iter(self._plans)))
        return plan

    def __call__(self, inputs: Sequence[torch.Tensor], shape: Sequence[int]) -> List[torch.Tensor]:
        shape = tuple(int(s) for s in shape)
        device = inputs[0].device
        outs = allocate_outputs(self.kir, shape, device)
        numel, args, rank, index64 = self._plan(inputs, shape)
        if self.kir.output_orders:  # each output's strides over the (left-padded) iteration space
            args = args + [st for o in outs for st in ([0] * (self.rank - o.dim()) + list(o.stride()))]
        if numel == 0:
            return outs
        fn = (self._cuda if device.type == "cuda" else self._portable).on(device)
        fn[(triton.cdiv(numel, BLOCK),)](*inputs, *outs, numel, *args, RANK=rank, INDEX64=index64, BLOCK=BLOCK,
                                         num_warps=NUM_WARPS, enable_fp_fusion=False)
        return outs
