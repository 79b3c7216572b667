"""The house's rules, checked on the code itself: who may import whom, and through what."""

from __future__ import annotations

import ast
from pathlib import Path

from cortex.leader import Leader
from cortex.ops.control import NodeControl

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cortex", "workers", "rpc")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, runtime_only: bool) -> set[str]:
    """Modules ``path`` imports; with ``runtime_only``, leaving out ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph(runtime_only: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    files["cortex.conf"] = ROOT / "conf"  # a data package: no code
    return {
        name: {m for m in _imports(path, runtime_only) if m in files and m != name}
        for name, path in files.items()
        if path.suffix == ".py"
    }


def test_operations_never_import_the_leader():
    """cortex/ops acts on the node through cortex.ops.control.NodeControl only: no ownership cycle."""
    graph = _graph(runtime_only=False)  # not even for type checking
    offenders = sorted(m for m, deps in graph.items() if m.startswith("cortex.ops") and "cortex.leader" in deps)
    assert offenders == []


def test_the_runtime_import_graph_has_no_cycles():
    graph = _graph(runtime_only=True)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep])}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_leader_offers_everything_operations_use():
    loop = ast.parse((ROOT / "cortex" / "leader" / "loop.py").read_text())
    init = ast.unparse(next(n for n in ast.walk(loop) if isinstance(n, ast.FunctionDef) and n.name == "__init__"))
    for name in NodeControl.__annotations__:
        assigned = f"self.{name} =" in init or f"self.{name}:" in init
        assert assigned or isinstance(getattr(Leader, name, None), property), f"Leader offers no {name}"
    methods = [n for n, v in vars(NodeControl).items() if callable(v) and not n.startswith("_")]
    assert methods and all(callable(getattr(Leader, n, None)) for n in methods), methods


MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 400


def test_no_module_or_class_is_a_warehouse():
    """One module, one job: none over 500 lines, no class over 400 (the leader was once 1,300 in one)."""
    too_long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = path.read_text().count("\n")
            name = str(path.relative_to(ROOT))
            if lines > MAX_MODULE_LINES:
                too_long.append(f"{name}: {lines} lines")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                    too_long.append(f"{name}: class {node.name} has {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []


def test_the_leader_is_rooms_that_own_their_state():
    """Each room of cortex/leader is its own module; only the loop knows them all."""
    rooms = {p.stem for p in (ROOT / "cortex" / "leader").glob("*.py")} - {"__init__"}
    assert rooms >= {"loop", "admission", "stepper", "lifecycle", "placement", "supervision", "views", "shared"}
    graph = _graph(runtime_only=True)
    importers = {m for m, deps in graph.items() if "cortex.leader.loop" in deps}
    assert importers <= {"cortex.leader"}, importers
