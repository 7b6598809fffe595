"""The package stays one a reader can find their way in: modules and functions of a
readable size, dependencies that point one way, and a map in docs/architecture.md that
lists every module."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "edgezo"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 8
# Lazy on purpose: `import edgezo` and `edgezo --help` must not import torch.
LAZY_IMPORTERS = {"edgezo"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(module-level, function-level) edgezo modules that `name` imports; imports under
    `if TYPE_CHECKING:` never run and do not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    inner: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        out = set()
        for target in names:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                out.add(target)
        return out

    def visit(node, in_function: bool) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (inner if in_function else top).update(targets(node))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, inner


def test_no_module_or_function_is_too_long():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES):
                long_functions.append(f"{name}.{node.name}")
    assert not long_modules and not long_functions


def test_few_modules_sit_directly_in_the_package():
    assert len(list(PACKAGE.glob("*.py"))) <= MAX_TOP_LEVEL_MODULES


def test_imports_point_one_way():
    """No cycle among edgezo's modules, counting function-level imports; and none of
    those outside the lazy package attribute."""
    known = modules()
    graph, late = {}, {}
    for name, path in known.items():
        top, inner = imports(name, path, known)
        graph[name] = top | inner
        if inner and name not in LAZY_IMPORTERS:
            late[name] = sorted(inner)
    assert not late, f"function-level imports of edgezo modules: {late}"
    done: set[str] = set()

    def walk(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):]
                                                              + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node] - (LAZY_IMPORTERS if node in LAZY_IMPORTERS else set())):
            walk(nxt, [*trail, node])
        done.add(node)

    for name in known:
        if name not in LAZY_IMPORTERS:  # its lazy attributes import on first use only
            walk(name, [])


def test_the_architecture_map_lists_every_module():
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    the_map = text.split("## The map", 1)[1].split("```", 2)[1]
    missing = [name for name, path in modules().items() if path.name != "__init__.py"
               and path.name not in the_map]
    missing += [p.name for p in (REPO / "cli").glob("*.py")
                if p.name != "__init__.py" and p.name not in the_map]
    assert not missing
