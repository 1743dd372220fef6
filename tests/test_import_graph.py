"""No import circle anywhere in worker/: the graph of its imports, read with ast, has no cycle.

Every import counts, wherever it is written: at the top, inside a function (a lazy import
still runs) and under `if TYPE_CHECKING:` (mypy follows it, and a circle there is a circle in
the design). It guards the coming reshape into packages."""

from __future__ import annotations

import ast
from pathlib import Path

WORKER = Path(__file__).resolve().parent.parent / "worker"


def module_name(root: Path, path: Path) -> str:
    """`worker/sandbox/app.py` -> `worker.sandbox.app`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.Module, here: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that one module's source imports. `from p import m` names the
    submodule p.m when there is one, else the module p (where the name is defined)."""
    package = here if is_package else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif base in known:
                    found.add(base)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module under `root` (a package folder) and the modules of `root` it imports."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {
        name: imported(
            ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known
        )
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components that hold a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_worker_has_no_import_cycle() -> None:
    """worker/'s import graph (top-level, lazy and TYPE_CHECKING imports) has no cycle."""
    graph = import_graph(WORKER)
    assert "worker.sandbox.app" in graph and "worker.cli" in graph  # the walk saw the tree
    assert cycles(graph) == []


def test_the_sandbox_config_does_not_import_the_server() -> None:
    """sandbox/config.py imports nothing of the sandbox: the circle app <-> config is gone."""
    graph = import_graph(WORKER)
    assert not {m for m in graph["worker.sandbox.config"] if m.startswith("worker.sandbox")}


def test_a_circle_under_type_checking_is_found(tmp_path: Path) -> None:
    """A circle closed only by an import under TYPE_CHECKING, inside a function or relative
    is reported, with its members."""
    pkg = _package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from pkg.b import B\n",
            "pkg/b.py": "def f():\n    from . import c\n",
            "pkg/c.py": "from .a import A\nimport pkg.d\n",
            "pkg/d.py": "import json\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.c"] == {"pkg.a", "pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_module_importing_itself_and_a_clean_tree(tmp_path: Path) -> None:
    """A self-import is a cycle; a tree whose modules only import downward has none."""
    pkg = _package(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.sub import x\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/x.py": "from pkg.sub import y\n",
            "pkg/sub/y.py": "",
            "pkg/z.py": "import pkg.z\n",
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.sub.x"] == {"pkg.sub.y"}
    assert cycles(graph) == [["pkg.z"]]


def _top_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.partition(".")[0])
    return names


def test_tests_and_benchmarks_do_not_import_each_other() -> None:
    """The tests never import bench, nor bench the tests: what both need is in worker."""
    repo = WORKER.parent
    tests = {p.name for p in (repo / "tests").rglob("*.py") if "bench" in _top_packages(p)}
    bench = {p.name for p in (repo / "bench").rglob("*.py") if "tests" in _top_packages(p)}
    assert (tests, bench) == (set(), set())
