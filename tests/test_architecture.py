"""ARCHITECTURE.md's module table is the import graph: every lmonnx module has a row, and the
row's `lmonnx imports` are exactly what the module imports (at any level, lazily or not),
`errors` and `validation` aside (any module may import them)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lmonnx"
FREE_FOR_ALL = {"errors", "validation"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "lmonnx"


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found.pop("lmonnx")  # the package's own __init__: the public names, not a layer
    found.pop("__main__")
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """lmonnx modules imported anywhere in the file (``from lmonnx import x`` counts x when it
    is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmonnx"):
            base = node.module.removeprefix("lmonnx").lstrip(".")
            names = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("lmonnx").lstrip(".") for a in node.names
                     if a.name.startswith("lmonnx")]
        found |= {n for n in names if n in known}
    return found


def _table() -> dict[str, set[str]]:
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        module = re.match(r"`([\w.]+)`", cells[0]).group(1)
        rows[module] = set(re.findall(r"`([\w.]+)`", cells[2]))
    return rows


def test_every_module_has_a_row_and_no_row_is_stale():
    assert set(_table()) == set(_modules())


def test_each_row_lists_exactly_what_the_module_imports():
    modules = _modules()
    known = set(modules)
    table = _table()
    wrong = {}
    for name, path in sorted(modules.items()):
        actual = _imports(path, known) - FREE_FOR_ALL - {name}
        if name == "xent":  # the kernel's Cython boundary is part of the same row
            pyx = (PACKAGE / "_xent.pyx").read_text(encoding="utf-8")
            actual |= set(re.findall(r"^from lmonnx\.([\w.]+) import", pyx, re.M)) - FREE_FOR_ALL
        if actual != table.get(name):
            wrong[name] = {"code": sorted(actual), "ARCHITECTURE.md": sorted(table.get(name, ()))}
    assert not wrong, wrong


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - FREE_FOR_ALL - {name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or None: a depth-first search that
    meets a module still on its path."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt)
            if found:
                return found
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_itself_through_others():
    """Lazy imports count too: a cycle that runs only at call time still ties two layers
    together (the server and its OpenAI routes did, through the request models)."""
    assert _cycle(_import_graph()) is None
