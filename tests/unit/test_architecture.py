"""The rules of ARCHITECTURE.md, checked on the source with ``ast``.

Every import counts, including those inside functions (modules import lazily
for start-up time; a lazy import is still a dependency), except those under
``if TYPE_CHECKING:``, which only annotations see.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "shadowvol"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted([*PKG.rglob("*.py"), *(ROOT / "kvm_module").rglob("*.py")]):
        out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def _walk_runtime(tree: ast.AST):
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


@lru_cache(maxsize=None)
def imports_of(mod: str) -> frozenset[str]:
    """Every module ``mod`` imports (absolute names; ``from X import y`` gives X.y when that is a module)."""
    path, tree = _modules()[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk_runtime(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            for a in node.names:
                if f"{name}.{a.name}" in _modules():
                    found.add(f"{name}.{a.name}")
    return frozenset(found)


def _ours(mod: str) -> set[str]:
    return {m for m in imports_of(mod) if m in _modules()}


def _in(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _select(*prefixes: str) -> list[str]:
    return [m for m in _modules() if _in(m, *prefixes)]


def test_the_graph_is_read() -> None:
    assert "shadowvol.backends.base" in _ours("shadowvol.paging")
    assert "shadowvol.plugins.linux.check_syscall" in _modules()
    assert len(_modules()) > 50


# 1. Backends only map and read: no volatility3, no CLI, no resolver, no other backend.
@pytest.mark.parametrize("mod", _select("shadowvol.backends"))
def test_backends_import_no_layer_above_nor_each_other(mod: str) -> None:
    allowed = ("shadowvol.backends.base", "shadowvol.errors", "shadowvol.qemu")
    if mod == "shadowvol.backends":  # the package re-exports its backends' openers
        allowed += ("shadowvol.backends",)
    bad = {m for m in _ours(mod) if not _in(m, *allowed) and m != "shadowvol"}
    assert not bad, f"{mod} imports {sorted(bad)}"
    assert not {m for m in imports_of(mod) if _in(m, "volatility3")}, f"{mod} imports volatility3"


# 2. volatility3 is imported by the bridge, the plugin runners and the plugins only.
VOL_IMPORTERS = ("shadowvol.volbridge", "shadowvol.voladapt", "shadowvol.run", "shadowvol.fidelity", "shadowvol.bench",
                 "shadowvol.plugins")


@pytest.mark.parametrize("mod", [m for m in _modules() if not _in(m, *VOL_IMPORTERS)])
def test_only_the_bridge_and_plugin_runners_import_volatility3(mod: str) -> None:
    assert not {m for m in imports_of(mod) if _in(m, "volatility3")}, f"{mod} imports volatility3"


# 3. Our plugins are plain volatility3 plugins: they import nothing of shadowvol (stock vol -p runs them).
@pytest.mark.parametrize("mod", _select("shadowvol.plugins"))
def test_plugins_stand_alone(mod: str) -> None:
    assert not {m for m in imports_of(mod) if _in(m, "shadowvol")}, f"{mod} imports shadowvol"


# 4. Translation and kernel location sit right above the backends' interface.
@pytest.mark.parametrize("mod,allowed", [
    ("shadowvol.paging", ("shadowvol.backends.base", "shadowvol.errors")),
    ("shadowvol.kaslr", ("shadowvol.backends.base", "shadowvol.errors", "shadowvol.paging")),
])
def test_paging_and_kaslr_import_nothing_above_backends_base(mod: str, allowed: tuple[str, ...]) -> None:
    bad = {m for m in _ours(mod) if not _in(m, *allowed) and m != "shadowvol"}
    assert not bad, f"{mod} imports {sorted(bad)}"


# 5. Profiles are built and stored without guests: symbols/ reads files, never memory or VMs.
@pytest.mark.parametrize("mod", _select("shadowvol.symbols"))
def test_symbols_never_touch_memory_or_vms(mod: str) -> None:
    allowed = ("shadowvol.symbols", "shadowvol.errors", "shadowvol.safeio", "shadowvol.paths")
    bad = {m for m in _ours(mod) if not _in(m, *allowed) and m != "shadowvol"}
    assert not bad, f"{mod} imports {sorted(bad)}"


# 6. Nothing below the command line imports it; the layers never import upward.
UPPER = ("shadowvol.cli", "shadowvol.run", "shadowvol.bench", "shadowvol.fidelity", "shadowvol.integrity",
         "shadowvol.trace", "shadowvol.target", "shadowvol.volbridge")
LOWER = ("shadowvol.backends", "shadowvol.qemu", "shadowvol.paging", "shadowvol.kaslr", "shadowvol.symbols",
         "shadowvol.profiles", "shadowvol.vm", "shadowvol.errors",
         "shadowvol.safeio", "shadowvol.paths", "kvm_module")


@pytest.mark.parametrize("mod", _select(*LOWER))
def test_lower_layers_never_import_upward(mod: str) -> None:
    bad = {m for m in _ours(mod) if _in(m, *UPPER)}
    assert not bad, f"{mod} imports {sorted(bad)}"


def test_only_main_imports_the_cli() -> None:
    users = {m for m in _modules() if "shadowvol.cli" in _ours(m)}
    assert users <= {"shadowvol.__main__"}, sorted(users)


# 7. No import cycles between modules (a package importing its own submodules is not one).
def test_no_import_cycles() -> None:
    graph = {m: {d for d in _ours(m) if not _in(m, d)} for m in _modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert not cycles, cycles


# 8. Nothing hangs state on a Target from outside target.py (caches belong to their owners).
def _target_variables(tree: ast.Module) -> set[str]:
    """``target``, and any name bound to ``open_target(...)`` in the module."""
    names = {"target"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if getattr(func, "id", getattr(func, "attr", None)) == "open_target":
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


@pytest.mark.parametrize("mod", [m for m in _modules() if m != "shadowvol.target"])
def test_no_attributes_set_on_a_target(mod: str) -> None:
    path, tree = _modules()[mod]
    names = _target_variables(tree)

    def is_target(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id in names) or (
            isinstance(node, ast.Attribute) and node.attr == "target")

    bad = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and is_target(t.value):
                bad.append(f"{path.name}:{t.lineno}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and node.args and is_target(node.args[0])):
            bad.append(f"{path.name}:{node.lineno}")
    assert not bad, f"attributes set on a Target at {bad}"
    assert "_sv_" not in path.read_text(encoding="utf-8")


def test_test_modules_have_unique_basenames():
    """pytest imports tests/unit and tests/live by basename (no packages): two files
    with one name stop the whole run at collection."""
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1], [n for n, c in names.items() if c > 1]


# 9. One resolver: only target.py (and vm/, which owns the registry) turns a VM name into a VM.
#    The `vm exec|cp` and `demo` commands drive a registry VM's console, not its memory: they
#    look the name up through vm/ as `vm stop` does.
def _functions_calling(tree: ast.Module, name: str) -> list[tuple[str, int]]:
    """(enclosing top-level function or "<module>", line) of every call to ``name``."""
    found = []
    for top in tree.body:
        where = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else "<module>"
        for node in ast.walk(top):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                found.append((where, node.lineno))
    return found


@pytest.mark.parametrize("mod", [m for m in _modules() if not _in(m, "shadowvol.target", "shadowvol.vm")])
def test_only_the_resolver_looks_up_vms(mod: str) -> None:
    path, tree = _modules()[mod]
    calls = _functions_calling(tree, "get_vm")
    if mod == "shadowvol.cli":
        calls = [(f, n) for f, n in calls if not (f.startswith("cmd_vm_") or f == "cmd_demo")]
    assert not calls, f"{path.name} calls get_vm() at {calls}: open a Target (target.open_target) instead"


# 10. Profiles are read through the Target's symbol API (symbol_address, type_size,
#     member_offset...): nothing outside the profile code, target.py and the bridge that hands
#     the ISF to volatility3 indexes an ISF by hand.
ISF_SECTIONS = ("symbols", "user_types", "base_types", "enums")
#: Modules still indexing an ISF by hand (none).
ISF_PENDING: tuple[str, ...] = ()


def _is_isf(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and "isf" in node.id) or (isinstance(node, ast.Attribute) and node.attr == "isf")


@pytest.mark.parametrize("mod", [m for m in _modules()
                                 if not _in(m, "shadowvol.symbols", "shadowvol.profiles", "shadowvol.target",
                                            "shadowvol.volbridge", *ISF_PENDING)])
def test_no_isf_indexed_by_hand(mod: str) -> None:
    path, tree = _modules()[mod]
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_isf(node.value):
            key = node.slice.value if isinstance(node.slice, ast.Constant) else None
            if key in ISF_SECTIONS or key is None:
                bad.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and _is_isf(node.func.value)):
            bad.append(node.lineno)
    assert not bad, f"{path.name} indexes an ISF at lines {bad}: use the Target's symbol API"


# 11. The source options (-vm, -f, --backend, --profile) are defined once, in target.py
#     (add_source_options), so they mean the same in every command.
SOURCE_OPTIONS = ("-vm", "-f", "--backend", "--profile")
#: Modules still defining a source option themselves (none).
OPTIONS_PENDING: tuple[str, ...] = ()


@pytest.mark.parametrize("mod", [m for m in _modules() if not _in(m, "shadowvol.target", *OPTIONS_PENDING)])
def test_source_options_defined_once(mod: str) -> None:
    path, tree = _modules()[mod]
    bad = [node.lineno for node in ast.walk(tree)
           if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
           and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in SOURCE_OPTIONS]
    assert not bad, f"{path.name} defines a source option at lines {bad}: use target.add_source_options"


# 12. No function longer than 100 lines: long ones are split by the concepts inside them.
#: Functions still over 100 lines (none).
LONG_PENDING: tuple[str, ...] = ()


def test_no_function_over_100_lines() -> None:
    long = []
    for mod, (path, tree) in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100 and f"{mod}.{node.name}" not in LONG_PENDING:
                    long.append(f"{mod}.{node.name} ({n} lines)")
    assert not long, long


# 13. One kernel reader. Its walkers live in plugins/linux/kernel.py, which loads with the
#     standard library alone (volatility3 only inside the functions that build it on a volatility3
#     context), so shadowvol's trace and integrity code reach the same walkers, without
#     volatility3, through kernel_reader.py (a Target's memory and symbol API), and only there.
READER = "shadowvol.plugins.linux.kernel"


def _top_level_imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add((node.module or "").split(".")[0])
    return found


def test_the_reader_loads_with_the_standard_library_alone() -> None:
    import sys

    tops = _top_level_imports(_modules()[READER][1])
    assert tops and tops <= set(sys.stdlib_module_names) | {"__future__"}, sorted(tops)


def test_shadowvol_reaches_the_reader_only_through_kernel_reader() -> None:
    users = sorted(m for m in _modules() if not _in(m, "shadowvol.plugins", "shadowvol.kernel_reader")
                   and {i for i in imports_of(m) if _in(i, "shadowvol.plugins.linux")})
    assert not users, f"{users} import plugin modules: use shadowvol.kernel_reader"


def test_trace_and_integrity_load_no_volatility3() -> None:
    """Imported for real, in a fresh interpreter: the package __init__ and the reader pull in no volatility3."""
    import subprocess
    import sys

    code = ("import sys, shadowvol.kernel_reader, shadowvol.integrity, shadowvol.trace.breakpoint\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'volatility3'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
