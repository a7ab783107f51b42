"""lowmem's modules import one another without cycles, counting imports inside functions too.

The graph is read from the source with `ast` (nothing is imported), so the test is fast and sees the imports a
function makes only when it runs.
"""
from __future__ import annotations

import ast
import os

from conftest import REPO

PACKAGE = "lowmem"


def package_modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the package under root (a package is its __init__)."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_names(module: str, path: str, node: ast.AST) -> list[str]:
    """The dotted names one import statement reaches: `from X import name` names X.name as well as X."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (module level and inside functions alike)."""
    modules = package_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(module, path, node):
                while name and name not in modules and "." in name:  # a class or function: its module
                    name = name.rsplit(".", 1)[0]
                own_package = module.startswith(name + ".")  # its package's __init__ runs first anyway
                if name in modules and name != module and not own_package:
                    graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets, each rotated to start at its smallest module."""
    found, state, stack = set(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):]
                first = cycle.index(min(cycle))
                found.add(tuple(cycle[first:] + cycle[:first]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return [list(c) for c in sorted(found)]


def test_the_graph_reader_sees_function_level_relative_and_submodule_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .data import b\n")
    (package / "data" / "b.py").write_text("from ..c import thing\n")
    (package / "c.py").write_text("import lowmem.a\n")
    graph = import_graph(str(tmp_path))
    assert graph["lowmem.a"] == {"lowmem.data", "lowmem.data.b"}
    assert graph["lowmem.data.b"] == {"lowmem.c"}
    assert cycles(graph) == [["lowmem.a", "lowmem.data.b", "lowmem.c"]]


def test_lowmem_has_no_import_cycles():
    found = cycles(import_graph(REPO))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c + c[:1]) for c in found)


def unit_of(module: str) -> str:
    """The package (or loose module) directly under lowmem that a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def allowed_imports(root: str) -> dict[str, set[str]]:
    """unit -> the units its docstring's `May import:` line names (a package's __init__, or a loose module)."""
    allowed = {}
    for module, path in package_modules(root).items():
        if module.count(".") != 1:  # lowmem itself, or a module inside a package
            continue
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        lines = [line for line in doc.splitlines() if line.startswith("May import:")]
        assert len(lines) == 1, f"{path}: its docstring needs one 'May import: a, b.' line"
        names = lines[0].removeprefix("May import:").strip().rstrip(".")
        allowed[unit_of(module)] = set() if names == "nothing" else {n.strip() for n in names.split(",")}
    return allowed


def disallowed_imports(root: str) -> list[str]:
    """Imports from one unit into another that the importing unit's docstring does not name."""
    allowed = allowed_imports(root)
    found = []
    for module, targets in import_graph(root).items():
        for target in targets:
            source, goal = unit_of(module), unit_of(target)
            if source != goal and goal != PACKAGE and goal not in allowed[source]:
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_each_package_imports_only_what_its_docstring_allows_and_nothing_imports_cli():
    allowed = allowed_imports(REPO)
    assert set(allowed) >= {"cli", "train", "infer", "checkpoint", "model", "data", "run", "fields"}
    assert not any("cli" in names for names in allowed.values()), "nothing may import cli"
    found = disallowed_imports(REPO)
    assert not found, "imports the importing package's docstring does not allow:\n" + "\n".join(found)


def test_at_most_three_loose_modules_in_the_package():
    loose = [name for name in os.listdir(os.path.join(REPO, PACKAGE))
             if name.endswith(".py") and name != "__init__.py"]
    assert len(loose) <= 3, loose


def test_an_import_the_docstring_does_not_allow_is_caught(tmp_path):
    package = tmp_path / PACKAGE
    for unit, may in (("run", "nothing"), ("model", "run")):
        (package / unit).mkdir(parents=True)
        (package / unit / "__init__.py").write_text(f'"""{unit}.\n\nMay import: {may}.\n"""\n')
    (package / "__init__.py").write_text("")
    (package / "run" / "a.py").write_text("def f():\n    from ..model import b\n")
    (package / "model" / "b.py").write_text("from ..run import a\n")
    assert allowed_imports(str(tmp_path)) == {"run": set(), "model": {"run"}}
    assert disallowed_imports(str(tmp_path)) == ["lowmem.run.a -> lowmem.model", "lowmem.run.a -> lowmem.model.b"]
