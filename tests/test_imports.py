"""The package's import graph: no cycles (lazy imports inside functions included), no private name imported from
another module, a private module imported only inside its own package; and no test module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"benchmark": "medrobust", "models": "medrobust.models", "attacks": "medrobust.attacks",
           "reports": "medrobust.reports"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if folder == "benchmark" or name not in modules:
                modules.setdefault(name, path)
    return modules


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement of a file but those under ``if TYPE_CHECKING:``."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, [alias.name for alias in child.names]))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if not module.startswith("medrobust"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES] or [module]
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def test_the_package_has_no_import_cycle() -> None:
    graph, state, path = _edges(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_private_name_is_imported_from_another_module() -> None:
    offences = []
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module, names in _imports(path):
            if not module.startswith("medrobust"):
                continue
            offences += [f"{name}: from {module} import {n}" for n in names
                         if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
            private = [part for part in module.split(".") if part.startswith("_")]
            owner = module.rpartition(".")[0]
            if private and not (package == owner or package.startswith(owner + ".")):
                offences.append(f"{name}: imports the private module {module} from outside {owner}")
    assert offences == []


def test_the_walk_sees_the_whole_package() -> None:
    # The checks above would pass on an empty graph: the walk must find the layers and their imports.
    graph = _edges()
    assert {"medrobust.runner.driver", "medrobust.attacks.state", "medrobust.results.store",
            "medrobust.data.index", "medrobust.vocabulary", "medrobust.plugins"} <= set(graph)
    assert "medrobust.runner.execute" in graph["medrobust.runner.executors"]
    assert "medrobust.attacks.geometry" in graph["medrobust.attacks.state"]


def test_no_test_module_imports_another() -> None:
    tests = {path.stem for path in (REPO / "tests").rglob("test_*.py")} | {"conftest"}
    offences = [f"{path.relative_to(REPO)}: {module}" for path in (REPO / "tests").rglob("*.py")
                for module, _ in _imports(path) if module.split(".")[0] in tests]
    assert offences == []


def test_the_documented_api_is_importable_from_medrobust() -> None:
    import medrobust

    for name in ("create_model", "list_models", "create_attack", "list_attacks", "load_config", "run", "plan",
                 "ResultStore", "write_report"):
        assert callable(getattr(medrobust, name)), name
