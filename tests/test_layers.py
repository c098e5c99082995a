"""The package's imports run only downward, in the layer order kunlun_compile/__init__.py writes down.

Every module under kunlun_compile/ is parsed (not imported) and every import in it is checked: at
top level, inside functions and classes, under `if`.  A module may import from its own package (or
itself) and from lower layers; siblings on one layer import neither each other.  A module that is
in no layer fails too: add it to the list in kunlun_compile/__init__.py.

Configuration has one source the same way: only config.py reads the environment (`ENV_VARS`,
`env_setting`), and README's table of environment variables lists exactly those.
"""
import ast
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kunlun_compile"
PACKAGE = "kunlun_compile"

# (importing file, imported module) -> why this upward import is not a dependency
ALLOWED = {
    ("vllm/plugin.py", "kunlun_compile"):
        "sets `kunlun_compile.vllm_fusion_pass` on the package object (vLLM resolves inductor_passes "
        "qualnames in the top-level package); uses nothing of it",
}


def layer_order(doc: str) -> List[Tuple[str, ...]]:
    """The "Layers" section of the package docstring: one tuple of sibling components per line, lowest first."""
    lines = doc.splitlines()
    start = lines.index("Layers") + 2  # the title, its underline
    layers, in_list = [], False
    for line in lines[start:]:
        if line.startswith("    ") and line.strip():
            in_list = True
            names = re.split(r"\s{2,}", line.strip())[0]
            layers.append(tuple(n.strip() for n in names.split("|")))
        elif in_list:
            break
    return layers


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join([PACKAGE] + parts)


def _component(module: str) -> str:
    """The layer component of a module of the package: its first name below the package
    ("kunlun_compile.lowering.cache" -> "lowering"); the package itself is "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(source: str, module: str, is_package: bool) -> List[Tuple[int, str, bool]]:
    """(line, imported module of the package, in a function) for every import in `source`, including
    those under `if`/`try` and in classes.  `from . import x` counts as importing `<package>.x`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import name`: name may be a submodule; what matters is the component either way,
            # except for the package itself, where each name is a component of its own
            targets = [f"{target}.{a.name}" for a in node.names] if target == PACKAGE else [target]
        else:
            targets = []
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                found.append((node.lineno, t, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def upward_imports(root: Path, layers: List[Tuple[str, ...]]) -> List[str]:
    rank: Dict[str, int] = {c: i for i, siblings in enumerate(layers) for c in siblings}
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        module = _module_name(path, root)
        is_package = path.name == "__init__.py"
        if is_package:
            module = module.rpartition(".")[0]
        own = "__init__" if module == PACKAGE else _component(module)
        if own not in rank:
            problems.append(f"{rel}: {own!r} is in no layer (add it to the Layers list in kunlun_compile/__init__.py)")
            continue
        for line, target, in_function in imports_of(path.read_text(), module, is_package):
            if (rel, target) in ALLOWED:
                continue
            other = _component(target)
            if not ((root / other).is_dir() or (root / f"{other}.py").is_file()):
                other = "__init__"  # `from kunlun_compile import __version__`: a name the package root defines
            if other == own:
                continue
            where = "in a function" if in_function else "top level"
            if other not in rank:
                problems.append(f"{rel}:{line}: imports {target} ({where}), which is in no layer")
            elif rank[other] > rank[own]:
                problems.append(f"{rel}:{line}: imports {target} ({where}): {other} is above {own}")
            elif rank[other] == rank[own]:
                problems.append(f"{rel}:{line}: imports {target} ({where}): {other} and {own} are siblings")
    return problems


def _package_doc() -> str:
    return ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text()), clean=False)


def test_the_layer_list_is_readable():
    layers = layer_order(_package_doc())
    flat = [c for siblings in layers for c in siblings]
    assert len(flat) == len(set(flat)), "a component listed twice"
    for c in ("config", "triton_kernel", "lowering", "ops", "capture", "passes", "runtime", "backend", "cli"):
        assert c in flat
    on_disk = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert set(flat) == on_disk, (f"listed but absent: {set(flat) - on_disk}; "
                                  f"present but unlisted: {on_disk - set(flat)}")


def test_imports_only_go_down():
    problems = upward_imports(ROOT, layer_order(_package_doc()))
    assert not problems, "upward imports (see the Layers list in kunlun_compile/__init__.py):\n" + "\n".join(problems)


@pytest.mark.parametrize("planted, where", [
    ("from ..passes.manager import PassContext\n", "top level"),
    ("def f():\n    from ..runtime import splitting\n", "in a function"),
    ("def f():\n    import kunlun_compile.backend\n", "in a function"),
    ("class C:\n    def f(self):\n        if True:\n            from ..cli import main\n", "in a function"),
    ("from .. import __version__\n", "top level"),
    ("try:\n    import kunlun_compile.cli.main as m\nexcept ImportError:\n    m = None\n", "top level"),
])
def test_a_planted_upward_import_is_named(tmp_path, planted, where):
    root = tmp_path / PACKAGE
    (root / "lowering").mkdir(parents=True)
    for name in ("__init__.py", "_version.py", "lowering/__init__.py"):
        (root / name).write_text("")
    (root / "lowering" / "planted.py").write_text('"""a module of lowering/"""\n' + planted)
    layers = [("_version",), ("lowering",), ("passes",), ("runtime",), ("backend",), ("cli",), ("__init__",)]
    problems = upward_imports(root, layers)
    assert len(problems) == 1 and problems[0].startswith("lowering/planted.py:") and where in problems[0], problems


def test_siblings_and_unlisted_modules_are_named(tmp_path):
    root = tmp_path / PACKAGE
    for d in ("vllm", "models"):
        (root / d).mkdir(parents=True)
        (root / d / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "vllm" / "a.py").write_text("from ..models import layers\n")
    (root / "stray.py").write_text("")
    problems = upward_imports(root, [("vllm", "models"), ("__init__",)])
    assert any("vllm/a.py:1" in p and "siblings" in p for p in problems), problems
    assert any(p.startswith("stray.py:") and "no layer" in p for p in problems), problems


# Files that touch os.environ besides config.py, and the (non-kunlun) variables they touch.
ENVIRON_USERS = {
    "vllm/plugin.py": "sets vLLM's own VLLM_USE_AOT_COMPILE, which vLLM reads from the environment",
    "vllm/reports.py": "reads vLLM's VLLM_CACHE_ROOT / XDG_CACHE_HOME to find vLLM's cache root",
}


def test_only_config_reads_the_environment():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                    and node.attr in ("environ", "getenv", "putenv", "unsetenv")):
                if rel not in ENVIRON_USERS:
                    found.append(f"{rel}:{node.lineno}: os.{node.attr} (read KUNLUN_COMPILE_* through "
                                 f"config.env_setting, pass values down instead of setting variables)")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"KUNLUN_COMPILE_[A-Z_]+", node.value):
                found.append(f"{rel}:{node.lineno}: the name {node.value!r} (use config's ENV_* constant)")
    assert not found, "\n".join(found)


def test_readme_lists_every_environment_variable():
    from kunlun_compile.config import ENV_VARS, CompileConfig, env_setting

    readme = (ROOT.parent / "README.md").read_text()
    section = readme.split("### Environment variables", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(KUNLUN_COMPILE_[A-Z_]+)", section, flags=re.M))
    assert listed == {v.name for v in ENV_VARS}
    for var in ENV_VARS:
        assert var.help and (var.option is None or var.option in CompileConfig.option_names())
        env_setting(var.name, {})  # every default is computable


def test_the_cache_directory_is_set_by_a_call_and_the_variable_wins(tmp_path, monkeypatch):
    """vllm/compiler.py sets the kernel cache beside vLLM's through `set_default_cache_dir`, not os.environ."""
    from kunlun_compile.config import ENV_CACHE_DIR
    from kunlun_compile.lowering import cache

    monkeypatch.delenv(ENV_CACHE_DIR, raising=False)
    monkeypatch.setattr(cache, "_default_root", None)
    cache.set_default_cache_dir(str(tmp_path / "beside_vllm"))
    assert cache.cache_dir() == tmp_path / "beside_vllm" / "pointwise"
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "from_env"))
    assert cache.cache_dir() == tmp_path / "from_env" / "pointwise"
