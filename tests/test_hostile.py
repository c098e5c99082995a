"""Hostile and unusual input: recorded graphs (capture/graph_io.py) and the kernel cache (lowering/cache.py).

Recorded graphs come from bug reports and cache directories can be edited, truncated or planted:
neither may run code the backend did not generate, and a bad cache entry must heal (regenerated,
one warning naming the file) instead of breaking later processes.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import stat
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kunlun_compile as kc
from kunlun_compile.capture.graph_io import TRUSTED_OP_NAMESPACES, UntrustedGraphError, graph_from_data
from kunlun_compile.capture.record import ENV_DUMP
from kunlun_compile.config import CompileConfig
from kunlun_compile.debug.record import load_recorded
from kunlun_compile.graph_stats import generated_kernels
from kunlun_compile.lowering import cache
from kunlun_compile.lowering.kir import KernelIR
from kunlun_compile.passes import PassContext
from kunlun_compile.passes.lower_elementwise import lower_elementwise

from .conftest import rel_err

PAYLOAD_MODULE = "kunlun_hostile_payload"


# ---- recorded graphs ----------------------------------------------------------------------------

def _call(name, target, *args, **kwargs):
    return {"op": "call_function", "name": name, "target": target, "args": {"tuple": list(args)},
            "kwargs": {"dict": kwargs}}


def _placeholder(target="arg0_1"):
    return {"op": "placeholder", "name": "arg0_1", "target": target, "args": {"tuple": []},
            "kwargs": {"dict": {}}}


X = {"node": "arg0_1"}
ADD = {"op": "aten::add", "overload": "Tensor"}


def _output(value):
    return {"op": "output", "name": "output", "target": "output", "args": {"tuple": [value]},
            "kwargs": {"dict": {}}}


def _recording(directory: Path, nodes) -> Path:
    """A graph directory as capture/record.py writes it: one float input of shape [4]."""
    directory.mkdir()
    (directory / "graph.json").write_text(json.dumps({"nodes": nodes}))
    spec = {"kind": "tensor", "shape": [4], "stride": [1], "dtype": "float32", "device": "cpu",
            "symbolic_dims": [], "parameter": False, "stats": {}}
    (directory / "inputs.json").write_text(json.dumps({"torch": torch.__version__, "seed": 0, "inputs": [spec]}))
    return directory


def _hostile_graphs(marker: Path):
    """name -> (the node the error must name, the graph's nodes); each creates `marker` if it runs."""
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def around(node):
        """`node` between the input and the graph's real work (it runs even though nothing uses it)."""
        return node["name"], [_placeholder(), node, _call("add", ADD, X, X), _output({"node": "add"})]

    return {
        "os.system": around(_call("system", {"py": "os", "name": "system"}, f"touch {marker}")),
        "builtins.exec": around(_call("run", {"py": "builtins", "name": "exec"}, touch)),
        "builtins.eval": around(_call("run", {"py": "builtins", "name": "eval"}, touch)),
        "unknown module import": around(_call("run", {"py": PAYLOAD_MODULE, "name": "run"})),
        "getattr chain to import_module": around(  # torch.ops.import_module.__func__: importlib in disguise
            _call("run", {"py": "torch.ops.import_module", "name": "__func__"}, PAYLOAD_MODULE)),
        "torch.save": around(_call("save", {"py": "torch", "name": "save"}, X, str(marker))),
        "builtins.getattr": around(_call("get", {"py": "builtins", "name": "getattr"}, X, "__class__")),
        "op namespace not trusted": around(_call("send", {"op": "hostile::send", "overload": "default"}, X)),
        "dtype naming a function": around(
            _call("cast", {"op": "aten::_to_copy", "overload": "default"}, X, dtype={"dtype": "save"})),
        "call_method": around({"op": "call_method", "name": "meth", "target": "__reduce_ex__",
                               "args": {"tuple": [X, 2]}, "kwargs": {"dict": {}}}),
        # names FX pastes into the code it generates: a placeholder's default, a keyword argument
        "placeholder target injection": ("arg0_1", [_placeholder(f"arg0_1={touch}"), _output(X)]),
        "keyword name injection": ("add", [_placeholder(), _call("add", ADD, X, **{f"alpha={touch} or 1, other": X}),
                                           _output({"node": "add"})]),
    }


HOSTILE = sorted(_hostile_graphs(Path("unused")))



@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_recorded_graph_is_rejected_naming_the_node_and_runs_nothing(case, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    payload_dir = tmp_path / "site"
    payload_dir.mkdir()
    (payload_dir / f"{PAYLOAD_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nrun = lambda *a: None\n")
    monkeypatch.syspath_prepend(str(payload_dir))
    node_name, nodes = _hostile_graphs(marker)[case]
    directory = _recording(tmp_path / "graph_0", nodes)
    with pytest.raises(UntrustedGraphError, match=rf"node \d+ \('{re.escape(node_name)}'\)"):
        module, inputs = load_recorded(str(directory))
        with torch.inference_mode():
            module(*inputs)
    assert not marker.exists(), "the recorded graph ran code"
    assert PAYLOAD_MODULE not in sys.modules


def test_whole_file_is_checked_before_anything_is_built(tmp_path, monkeypatch):
    """A bad node after a good one: nothing of the good one is resolved or built either."""
    nodes = [_placeholder(), _call("add", ADD, X, X), _call("run", {"py": PAYLOAD_MODULE, "name": "run"}),
             _output({"node": "add"})]
    built = []
    monkeypatch.setattr(torch.fx.Graph, "create_node", lambda *a, **k: built.append(a))
    with pytest.raises(UntrustedGraphError, match=r"node 2 \('run'\).*kunlun_hostile_payload\.run"):
        graph_from_data({"nodes": nodes}, {})
    assert built == []


MALFORMED = {
    "reference to a later node": ("add", [_placeholder(), _call("add", ADD, X, {"node": "later"}),
                                          _call("later", ADD, X, X), _output({"node": "add"})]),
    "getitem with one argument": ("item", [_placeholder(), _call("item", {"py": "_operator", "name": "getitem"}, X),
                                           _output({"node": "item"})]),
    "placeholder default naming a node": ("late", [_placeholder(), {**_placeholder("late"), "name": "late",
                                                                   "args": {"tuple": [X]}}, _output(X)]),
    "untagged argument": ("add", [_placeholder(), _call("add", ADD, X, {"node": "arg0_1", "extra": 1}),
                                  _output({"node": "add"})]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recorded_graph_is_a_value_error_naming_the_node(case):
    node_name, nodes = MALFORMED[case]
    with pytest.raises(ValueError, match=rf"recorded graph, node \d+ \('{node_name}'\)"):
        graph_from_data({"nodes": nodes}, {})


class Constants(torch.nn.Module):
    def forward(self, x):
        n = x.shape[0]
        mask = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        table = torch.tensor([1.0, 2.0, 3.0])  # a tensor constant: a get_attr and constants.pt
        ramp = torch.arange(n + 1, dtype=x.dtype)[1:, None]  # n + 1: symbolic-shape arithmetic in the graph
        return (x @ x.T + mask).softmax(-1).sum(-1, keepdim=True) * table[1] + n + ramp


def _record_constants_model(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(ENV_DUMP, str(tmp_path / "dump"))
    compiled = kc.compile(Constants(), dynamic=True, strict=True)
    with torch.inference_mode():
        compiled(torch.randn(5, 4))
    (report,) = compiled.kunlun_backend.report.graphs
    return report.recorded_at


def test_a_real_recording_still_loads_and_matches_eager(tmp_path, monkeypatch):
    recorded = _record_constants_model(tmp_path, monkeypatch)
    targets = [n["target"] for n in json.load(open(os.path.join(recorded, "graph.json")))["nodes"]]
    assert any(isinstance(t, dict) and t.get("py") == "_operator" for t in targets)  # symbolic-shape arithmetic
    assert os.path.isfile(os.path.join(recorded, "constants.pt"))
    module, inputs = load_recorded(recorded)
    x = torch.randn_like(inputs[0])  # fresh values, the recorded shape
    with torch.inference_mode():
        got = module(x)
    got = got[0] if isinstance(got, tuple) else got
    assert rel_err(got, Constants()(x)) < 1e-6


def test_constants_file_is_never_unpickled(tmp_path, monkeypatch):
    recorded = _record_constants_model(tmp_path, monkeypatch)
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(os.path.join(recorded, "constants.pt"), "wb") as f:
        pickle.dump({"_tensor_constant0": Payload()}, f)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses the payload's class
        load_recorded(recorded)
    assert not marker.exists()


def test_the_backends_own_op_namespaces_are_trusted():
    """Every namespace this package registers custom ops in can be loaded back from a recording."""
    root = Path(kc.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        found |= set(re.findall(r"custom_op\(\s*[\"'](\w+)::", path.read_text()))
    from kunlun_compile.models.attention_op import ATTENTION_OP_NAME
    found.add(ATTENTION_OP_NAME.split("::")[0])
    assert found and found <= TRUSTED_OP_NAMESPACES, found - TRUSTED_OP_NAMESPACES


# ---- the kernel cache ----------------------------------------------------------------------------

def _fn(x):
    return torch.sigmoid(x) * x + 0.5


def _lowered(x):
    gm = make_fx(_fn, tracing_mode="fake")(x)
    lower_elementwise(gm, PassContext(CompileConfig.from_options({}), "t"))
    gm.recompile()
    return gm


@pytest.fixture
def process(tmp_path, monkeypatch):
    """This process's in-memory kernel state, fresh; `process.restart()` makes it a later process."""
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / "cache"))

    class Process:
        @staticmethod
        def restart():
            for name, value in (("_registry", {}), ("_kernels", {}), ("_kir_on_disk", set()), ("_warned", set()),
                                ("stats", collections.Counter())):
                monkeypatch.setattr(cache, name, value, raising=False)

    Process.restart()
    return Process


def _run_checked(x_shape=(4, 8)):
    """Lower and run `_fn` on fresh random inputs: (relative error against eager, warning messages, kernel key)."""
    x = torch.randn(*x_shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = _lowered(x)
        fresh = torch.randn(*x_shape)
        err = rel_err(gm(fresh), _fn(fresh))
    (key,) = generated_kernels(gm)
    return err, [str(w.message) for w in caught], key


def _naming(messages, path):
    return [m for m in messages if str(path) in m]


def _double_the_output(text):
    return re.sub(r"tl\.store\(out0 \+ idx, (v\d+)", r"tl.store(out0 + idx, 2.0 * \1", text)


def _plant(marker):
    return lambda text: f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + text


SOURCE_DAMAGE = {
    "edited to double the output": _double_the_output,
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not utf-8": lambda text: "\udcff".encode("utf-8", "surrogateescape") + b"\xfe garbage",
    "planted code": None,  # needs the marker: built in the test
}


@pytest.mark.parametrize("damage", sorted(SOURCE_DAMAGE))
def test_damaged_kernel_source_is_regenerated_with_one_warning(damage, process, tmp_path):
    err, _, key = _run_checked()
    path = cache.source_path(key)
    assert err < 1e-6 and path.is_file()
    marker = tmp_path / "marker"
    change = SOURCE_DAMAGE[damage] or _plant(marker)
    damaged = change(path.read_text())
    assert damaged != path.read_text()
    (path.write_bytes if isinstance(damaged, bytes) else path.write_text)(damaged)

    process.restart()  # a later process
    err, messages, _ = _run_checked()
    assert err < 1e-6
    assert len(_naming(messages, path)) == 1, messages
    assert not marker.exists()
    assert cache.stats["generated"] == 1

    process.restart()  # healed: read back without a warning
    err, messages, _ = _run_checked()
    assert err < 1e-6 and _naming(messages, path) == [] and cache.stats["read_from_disk"] == 1


def _kir_file(key) -> Path:
    return Path(os.environ[cache.ENV_CACHE_DIR]) / "pointwise" / cache.kir_name(key)


def _change_constant(text):
    entry = json.loads(text)
    payload = entry.get("kir", entry)
    for instr in payload["instrs"]:
        if instr[0] == "const" and instr[3] == 0.5:
            instr[3] = 5.0
    return json.dumps(entry)


def _change_constant_and_rehash(text):
    """A consistent entry (valid hash) for a different kernel under this key's name."""
    entry = json.loads(_change_constant(text))
    return cache._kir_entry(KernelIR.from_json(entry.get("kir", entry)))


KIR_DAMAGE = {
    "constant changed": _change_constant,
    "constant changed, hash recomputed": _change_constant_and_rehash,
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
}


@pytest.mark.parametrize("damage", sorted(KIR_DAMAGE))
def test_damaged_kernel_ir_is_a_miss_named_in_the_error_and_healed_by_recompiling(damage, process):
    _, _, key = _run_checked()
    path = _kir_file(key)
    path.write_text(KIR_DAMAGE[damage](path.read_text()))
    cache.source_path(key).unlink()  # so a tampered KIR would be compiled into new source

    process.restart()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyError, match=re.escape(str(path))):  # a graph naming the key, nothing recompiled
            cache.kir_for(key)
    err, messages, _ = _run_checked()  # recompiling registers the KIR again: the entry is overwritten
    assert err < 1e-6
    assert len(_naming([str(w.message) for w in caught] + messages, path)) == 1

    process.restart()  # healed
    assert cache.kir_for(key).key == key and cache.stats["kir_from_disk"] == 1


def _unwritable_primary(tmp_path, monkeypatch) -> Path:
    """The configured cache directory cannot be created; returns where the fallback goes."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(blocker / "cache"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return tmp / f"kunlun_compile_{os.getuid()}"


def test_fallback_directory_is_created_owner_only(process, tmp_path, monkeypatch):
    fallback = _unwritable_primary(tmp_path, monkeypatch)
    err, messages, key = _run_checked()
    assert err < 1e-6 and messages == []
    for d in (fallback, fallback / "pointwise"):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    assert (fallback / "pointwise" / cache.source_name(key)).is_file()


def _make_unsafe(fallback: Path, how: str, tmp_path: Path) -> None:
    if how == "symlink":
        real = tmp_path / "elsewhere"
        real.mkdir(mode=0o700)
        fallback.symlink_to(real)
        return
    fallback.mkdir(mode=0o700)
    if how == "owned by another user":
        os.chown(fallback, 4242, 4242)
    else:
        os.chmod(fallback, {"world-writable": 0o777, "group-writable": 0o770, "sticky /tmp-like": 0o1777}[how])


@pytest.mark.parametrize("how", ["owned by another user", "world-writable", "group-writable", "sticky /tmp-like",
                                 "symlink"])
def test_unsafe_fallback_directory_is_refused_and_kernels_stay_in_memory(how, process, tmp_path, monkeypatch):
    _, _, key = _run_checked()  # the kernel's key, from a normal cache
    fallback = _unwritable_primary(tmp_path, monkeypatch)
    _make_unsafe(fallback, how, tmp_path)
    marker = tmp_path / "marker"
    planted = fallback / "pointwise"
    planted.mkdir()
    for name in {cache.source_name(key), f"{key}_v3.py"}:  # the entry names, this and the old layout
        (planted / name).write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    before = sorted(p.name for p in planted.iterdir())

    process.restart()
    err, messages, _ = _run_checked()
    assert err < 1e-6
    assert not marker.exists(), "a planted kernel ran"
    assert sorted(p.name for p in planted.iterdir()) == before  # nothing written there either
    assert len(_naming(messages, fallback)) == 1, messages
    err, messages, _ = _run_checked()  # warned once per process
    assert err < 1e-6 and _naming(messages, fallback) == []


def test_threads_asking_for_one_key_on_a_cold_directory(process, tmp_path, monkeypatch):
    """What the CUDA precompile pool does: several threads load the same new kernel at once."""
    x = torch.randn(4, 8)
    (key,) = generated_kernels(_lowered(x))
    kir = cache.kir_for(key)
    threads_per_trial = 8
    for trial in range(20):
        monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / f"cold{trial}"))
        process.restart()
        barrier = threading.Barrier(threads_per_trial)
        kernels, errors = [None] * threads_per_trial, []

        def load(i, barrier=barrier, kernels=kernels, errors=errors):  # this trial's, bound now
            try:
                barrier.wait()
                cache.register(kir)
                kernels[i] = cache.kernel_for(key)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(threads_per_trial)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [], f"trial {trial}: {errors!r}"
        fresh = torch.randn(4, 8)
        for kernel in {id(k): k for k in kernels}.values():
            (out,) = kernel([fresh], fresh.shape)
            assert rel_err(out, _fn(fresh)) < 1e-6
        left = sorted(p.name for p in (tmp_path / f"cold{trial}" / "pointwise").iterdir())
        assert not [n for n in left if n.endswith(".tmp")], left
    process.restart()  # what the threads left is a valid entry
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.register(kir)
        cache.kernel_for(key)
    assert caught == [] and cache.stats["read_from_disk"] == 1
