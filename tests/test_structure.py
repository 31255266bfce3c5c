"""The shape of the package a newcomer relies on: no import circles, no giant files, no giant functions.

Imports are read from the source (function-local ones included), not executed, so an import hidden in a function
body cannot tie two modules into a circle unnoticed.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgedistill"
LIBRARY_FOLDERS = ("edgedistill", "export", "demo")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
# The one training loop may be long: it reads top to bottom as numbered steps (STYLE.md).
LONG_FUNCTIONS_ALLOWED = {("edgedistill/train.py", "train")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set) -> set:
    """Every edgedistill module that ``path`` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from . import x` names a submodule; `from .a import b` names module a (or its submodule a.b).
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def import_graph() -> dict:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), plus modules importing themselves."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_reader_sees_relative_and_function_local_imports():
    graph = import_graph()
    assert "edgedistill.recipe" in graph["edgedistill.cli"]  # imported inside a handler function
    assert "edgedistill.data.cache" in graph["edgedistill.stages"]


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_edgedistill_modules():
    found = cycles(import_graph())
    assert not found, f"import circles (function-local imports included): {found}"


def test_recipe_is_a_leaf():
    graph = import_graph()
    assert graph["edgedistill.recipe"] <= {"edgedistill.recipe_types"} and graph["edgedistill.recipe_types"] == set()


def library_files():
    for folder in LIBRARY_FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_library_file_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in library_files() if (n := len(p.read_text().splitlines()))
            >= MAX_FILE_LINES}
    assert not long, f"files of {MAX_FILE_LINES} lines or more: {long}"


def test_no_function_outside_the_training_loop_is_over_60_lines():
    long = {}
    for path in library_files():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    long[f"{rel}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_nothing_in_the_library_unpickles():
    # Run folders and bundles are read as tensors and plain data only: a folder someone sent you cannot run code.
    found = [str(p.relative_to(ROOT)) for p in library_files() if "weights_only=False" in p.read_text()]
    assert not found, f"weights_only=False in {found}"


def test_every_library_package_ships_in_the_wheel():
    """pyproject lists packages by name: a new sub-package left off that list is missing from the built wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgedistill").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
