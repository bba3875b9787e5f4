"""The import graph of gridgen: no cycles, and the library never imports an entry point.

Every module under ``src/gridgen`` is parsed with ``ast``; every ``import`` counts, also those inside functions
(they run when the function does), except under ``if TYPE_CHECKING:`` (never executed). No allowlist.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ENTRY_POINTS = {f"gridgen.{name}" for name in ("train", "prepare", "generate", "evaluate", "cache", "report")}
# The miniature's runner (`make mini`) sits beside the entry points: it calls their functions in one process, and
# nothing else imports it.
RUNNER = "gridgen.mini"
# The embedded wing (tiny FLUX, sample data) stands on models/, data/ and the ground floor; models/ and data/ reach it
# only inside a function of these seams (resolve_pretrained("embedded:tiny"), GridDataModule.prepare_data).
EMBEDDED = "gridgen.embedded"
EMBEDDED_MAY_IMPORT = ("gridgen.embedded", "gridgen.models", "gridgen.data", "gridgen.layout", "gridgen.config",
                       "gridgen._quiet", "gridgen.cameras", "gridgen.files", "gridgen.runtime", "gridgen.video")
EMBEDDED_SEAMS = {"gridgen.models.loading", "gridgen.data.datamodule"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Fully qualified names that ``module`` imports (``from a import b`` gives ``a.b`` and ``a``)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def without_functions(tree: ast.AST) -> ast.AST:
    """``tree`` without the bodies of functions: what importing the module runs."""

    class Strip(ast.NodeTransformer):
        def visit_FunctionDef(self, node: ast.AST) -> None:
            return None

        visit_AsyncFunctionDef = visit_FunctionDef

    return Strip().visit(copy.deepcopy(tree))


def import_graph(eager_only: bool = False) -> dict[str, set[str]]:
    """gridgen module -> the gridgen modules it imports (``eager_only``: at import time, not inside a function)."""
    files = {module_name(p): p for p in sorted((SRC / "gridgen").rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        names = imported_names(without_functions(tree) if eager_only else tree, module, path.name == "__init__.py")
        targets = set()
        for name in names:
            if name in files:
                targets.add(name)
            elif name.rpartition(".")[0] in files and name.startswith("gridgen"):
                targets.add(name.rpartition(".")[0])  # `from gridgen.x import attr`: the module gridgen.x
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_graph_helpers_find_what_they_should():
    tree = ast.parse("from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n    import gridgen.c\n"
                     "def f():\n    from gridgen.d import thing\n")
    assert imported_names(tree, "gridgen.a", False) >= {"gridgen.b", "gridgen.d", "gridgen.d.thing"}
    assert "gridgen.c" not in imported_names(tree, "gridgen.a", False)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_every_module():
    graph = import_graph()
    assert {"gridgen.layout", "gridgen.losses", "gridgen.data.prepare", "gridgen.eval.pipeline"} <= set(graph)
    assert "gridgen.data.prepare" in graph["gridgen.prepare"]  # the entry point calls the library


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_import_graph_eager_only_skips_function_bodies():
    tree = ast.parse("import gridgen.a\ndef f():\n    import gridgen.b\nclass C:\n    def g(self):\n"
                     "        import gridgen.c\n")
    assert imported_names(without_functions(tree), "gridgen.x", False) == {"gridgen.a"}
    assert imported_names(tree, "gridgen.x", False) == {"gridgen.a", "gridgen.b", "gridgen.c"}


def test_the_embedded_wing_stands_on_models_and_data_only():
    graph = import_graph()
    assert {f"{EMBEDDED}.flux_tiny", f"{EMBEDDED}.sample_data"} <= set(graph)
    bad = sorted(f"{module} imports {target}" for module, targets in graph.items() if in_package(module, EMBEDDED)
                 for target in targets if not any(in_package(target, allowed) for allowed in EMBEDDED_MAY_IMPORT))
    assert not bad, "; ".join(bad)


def test_models_and_data_reach_the_embedded_wing_only_through_its_seams():
    """Only resolve_pretrained and GridDataModule.prepare_data call into gridgen.embedded, inside the function."""
    graph, eager = import_graph(), import_graph(eager_only=True)
    lower = [m for m in graph if in_package(m, "gridgen.models") or in_package(m, "gridgen.data")]
    users = {m for m in lower if any(in_package(t, EMBEDDED) for t in graph[m])}
    assert users == EMBEDDED_SEAMS, f"models/data modules importing {EMBEDDED}: {sorted(users)}"
    eager_users = sorted(m for m in lower if any(in_package(t, EMBEDDED) for t in eager[m]))
    assert not eager_users, f"{EMBEDDED} imported at import time (not inside the seam function) by {eager_users}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_library_never_imports_an_entry_point():
    bad = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                 if module not in ENTRY_POINTS and not in_package(module, RUNNER) for target in targets & ENTRY_POINTS)
    assert not bad, "; ".join(bad)


def test_only_the_runner_imports_the_runner():
    graph = import_graph()
    assert {f"{RUNNER}.build", f"{RUNNER}.runs"} <= set(graph)
    bad = sorted(f"{module} imports {target}" for module, targets in graph.items() if not in_package(module, RUNNER)
                 for target in targets if in_package(target, RUNNER))
    assert not bad, "; ".join(bad)


def entry_point_launches(tree: ast.AST) -> list[int]:
    """Lines where code lists ``"-m", "gridgen.<entry point>"`` (a subprocess of an entry point, as an argv)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple):
            words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            if any(a == "-m" and b in ENTRY_POINTS for a, b in zip(words, words[1:], strict=False)):
                lines.append(node.lineno)
    return lines


def test_library_never_starts_an_entry_point_as_a_process():
    """Evaluation generates through the library's generate function, in its own process: no `python -m gridgen.*`
    argv anywhere in src/ (the check finds the one `eval/generation.py` used to build)."""
    old = 'command = [sys.executable, "-m", "gridgen.generate", *args]\nsubprocess.Popen(command)\n'
    assert entry_point_launches(ast.parse(old)) == [1]
    bad = [f"{path.relative_to(SRC)}:{line}" for path in sorted((SRC / "gridgen").rglob("*.py"))
           for line in entry_point_launches(ast.parse(path.read_text(), str(path)))]
    assert not bad, "a subprocess of a gridgen entry point: " + ", ".join(bad)


GROUND_FLOOR = {f"gridgen.{name}" for name in ("layout", "losses", "files", "runtime", "video", "cameras")}


def test_the_ground_floor_imports_no_wing():
    """``layout``, ``files``, ``runtime``, ``video``, ``cameras``: every wing stands on them, so they import no
    other gridgen module (only each other)."""
    graph = import_graph()
    assert {"gridgen.files", "gridgen.runtime"} <= set(graph)
    bad = sorted(f"{module} imports {target}" for module in GROUND_FLOOR & set(graph)
                 for target in graph[module] - GROUND_FLOOR - {"gridgen"})
    assert not bad, "; ".join(bad)
