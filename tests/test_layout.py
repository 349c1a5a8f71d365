"""The package's layering, read from the source with `ast` (nothing is imported):

- the product never imports the research workflow: no module of ``src/fedmarket`` outside ``lab/`` imports
  ``fedmarket.lab`` (the CLI may, inside its command functions, where the ``grid``/``merge``/... commands run);
- no import cycle among the package's modules (module-level and function-level imports both), except the
  known ones listed in ``KNOWN_CYCLES``, which may shrink but not grow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedmarket"

# The import cycles that remain, as the one import edge of each that closes it, with why it is there. With
# these edges left out the import graph must have no cycle: a new cycle fails test_no_new_import_cycles, and an
# entry whose edge is gone or closes no cycle any more fails test_known_cycles_still_exist (remove it then).
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {
    ("fedmarket.methods.base", "fedmarket.methods"): (
        "the method registry: get_method imports the package, whose __init__ imports every method module "
        "(each imports fedmarket.methods.base) to register the built-in methods"
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside ``if TYPE_CHECKING:`` (never executed)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                return True
    return False


def imported_names(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) for every import the file executes, at module level or inside a
    function; relative imports resolved. ``from a import b`` gives ``a.b`` (a submodule, or a name of ``a``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
            continue
        top = parents.get(node) is tree
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, top) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        found += [(f"{base}.{alias.name}", node.lineno, top) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports: ``import a.b`` and ``from a import b`` where ``a.b`` is a
    module count as importing ``a.b``; ``from a import name`` counts as importing ``a``. (That importing ``a.b``
    first runs the package ``a``'s ``__init__`` is not counted: a package's ``__init__`` re-exports its
    submodules.)"""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _, _ in imported_names(name, path):
            module = target if target in known else target.rpartition(".")[0]
            if module in known and module != name:
                graph[name].add(module)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The import cycles: strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_product_never_imports_the_lab() -> None:
    offenders = []
    for name, path in modules().items():
        if name == "fedmarket.lab" or name.startswith("fedmarket.lab."):
            continue
        for target, line, top in imported_names(name, path):
            if target == "fedmarket.lab" or target.startswith("fedmarket.lab."):
                if name == "fedmarket.cli" and not top:
                    continue  # a command function of the CLI, imported when that command runs
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not offenders, "the product imports the lab:\n" + "\n".join(offenders)


def without_known_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in targets if (a, b) not in KNOWN_CYCLE_EDGES} for a, targets in graph.items()}


def test_no_new_import_cycles() -> None:
    graph = without_known_edges(import_graph())
    lines = []
    for component in strongly_connected(graph):
        edges = sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in component)
        lines.append(f"cycle among {sorted(component)}:\n  " + "\n  ".join(edges))
    assert not lines, "import cycles in the package:\n" + "\n".join(lines)


def test_known_cycles_still_exist() -> None:
    """Each allowed edge is still there and still closes a cycle (else it is to be removed from the list)."""
    graph = import_graph()
    cycles = strongly_connected(graph)
    stale = [
        edge
        for edge in KNOWN_CYCLE_EDGES
        if edge[1] not in graph.get(edge[0], set()) or not any(set(edge) <= c for c in cycles)
    ]
    assert not stale, (
        f"these import edges close no cycle any more; remove them from KNOWN_CYCLE_EDGES: {stale}"
    )


def test_the_graph_sees_module_and_function_level_imports() -> None:
    """The checks above rest on the graph: it holds the CLI's lazy import of the lab and a module-level one."""
    graph = import_graph()
    assert "fedmarket.lab.runs" in graph["fedmarket.cli"]  # inside cmd_merge
    assert "fedmarket.api" in graph["fedmarket.lab.runs"]  # module level
    assert "fedmarket.eval.convergence" in graph["fedmarket.report"]
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [frozenset({"a", "b"})]
