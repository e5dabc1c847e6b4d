"""The package's import structure: no module of megarank/ is in an import cycle (counting imports inside
functions too), and the layers import only downwards (docs/architecture.md, "Module layout")."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megarank"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict) -> str | None:
    """The megarank module an import of ``name`` loads (a name inside a module resolves to that module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict:
    """{module: {megarank modules it imports anywhere in its source}}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for n in names:
                target = _resolve(n, modules)
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycle(graph: dict) -> list | None:
    """One import cycle of ``graph``, or None (a package importing its own submodules is not a cycle unless the
    submodule imports the package back)."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_megarank_is_in_an_import_cycle():
    graph = import_graph()
    # ``pkg/__init__`` re-exporting its submodules is the package's own surface, not a dependency of them.
    for name in list(graph):
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


LAYERS = {  # docs/architecture.md: cli -> training / scoring -> model, data, checkpoint -> parallel, config
    "megarank.checkpoint": ("megarank.training", "megarank.scoring", "megarank.cli", "megarank.model", "megarank.data"),
    "megarank.model": ("megarank.training", "megarank.scoring", "megarank.cli", "megarank.checkpoint", "megarank.data"),
    "megarank.data": ("megarank.training", "megarank.scoring", "megarank.cli", "megarank.model", "megarank.checkpoint"),
    "megarank.scoring": ("megarank.training", "megarank.cli"),
    "megarank.training": ("megarank.cli",),
    "megarank.parallel": ("megarank.training", "megarank.scoring", "megarank.cli", "megarank.model", "megarank.data",
                          "megarank.checkpoint"),
    "megarank.config": ("megarank.training", "megarank.scoring", "megarank.cli", "megarank.model", "megarank.data",
                        "megarank.checkpoint", "megarank.parallel"),
}


@pytest.mark.parametrize("lower, upper", [(lo, up) for lo, ups in LAYERS.items() for up in ups])
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() if m == lower or m.startswith(lower + ".")
                 for t in ts if t == upper or t.startswith(upper + "."))
    assert not bad, f"{lower} must not import {upper}: {bad}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
