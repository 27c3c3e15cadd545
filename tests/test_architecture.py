"""The dependency structure (docs/design.md): imports only point down, no module import cycle, and nothing in the
library imports a command-line module. Walks the project's own source, so a new module is checked too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clients", "server", "simulation", "strategies")
# The top floor: what a person runs. `simulation.cli` is the argument parsing those commands share.
COMMANDS = {"simulation.run", "simulation.deploy", "simulation.keys"}
TOP_FLOOR_HELPERS = {"simulation.cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def is_command(name: str) -> bool:
    return name in COMMANDS or name.endswith(".__main__")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported project module, imported inside a function?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                targets = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.split(".")[0] in PACKAGES:
                    found.append((target, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    local_imports = []
    for name, path in modules.items():
        for target, in_function, line in imports_of(name, path, modules):
            graph[name].add(target)
            if in_function:
                local_imports.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    return graph, local_imports


def test_there_is_no_import_cycle():
    graph, _ = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [node, target]) if target in stack
                              else f"{node} -> {target}")
            elif target not in state:
                walk(target, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_library_code_never_imports_a_command_line_module():
    graph, _ = import_graph()
    top = {name for name in graph if is_command(name)} | TOP_FLOOR_HELPERS
    assert COMMANDS <= set(graph) and any(name.startswith("server.attacks.") and is_command(name) for name in graph)
    wrong = [f"{name} imports {target}" for name, targets in graph.items() for target in targets
             if target in top and (name not in top or is_command(target))]
    assert not wrong, "\n".join(wrong)


def test_no_project_module_is_imported_inside_a_function():
    _, local_imports = import_graph()
    assert not local_imports, "\n".join(local_imports)


def test_the_checker_sees_a_cycle_and_a_local_import(tmp_path, monkeypatch):
    """The walk above must be able to fail: a planted pair of modules that import each other, one inside a function."""
    import tests.test_architecture as checker

    package = tmp_path / "clients"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import clients.b\n")
    (package / "b.py").write_text("def f():\n    from clients import a\n")
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    monkeypatch.setattr(checker, "PACKAGES", ("clients",))
    graph, local_imports = checker.import_graph()
    assert graph["clients.a"] == {"clients.b"} and "clients.a" in graph["clients.b"]
    assert local_imports and all(entry.startswith("clients/b.py:2 ") for entry in local_imports)
