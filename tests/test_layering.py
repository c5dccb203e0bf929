"""The package's imports flow one way (docs/concepts.md, "Layering").

Read from the source with `ast`, so nothing is imported: every `import` counts, the ones inside functions too (a
deferred import still ties the two modules together). Three rules:

- no import cycle between modules;
- a subpackage imports only subpackages below it in `LAYERS` (its own modules aside), or on its row when the
  subpackages of the row do not import each other in a circle;
- no module imports a private name (`_x`) of another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "optimum_neuron_peft"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. A subpackage (or top-level module) may import the ones on earlier rows; the ones on one row may import
# each other one way only.
LAYERS = [
    ["errors"],
    ["utils"],
    ["formats"],
    ["transformations"],
    ["parallel"],
    ["models", "peft"],
    ["checkpoint"],
    ["merging"],
    ["merge_utils"],
    ["training"],
    ["demo"],
    ["cli"],
    ["__main__"],
]
RANK = {name: rank for rank, row in enumerate(LAYERS) for name in row}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _imports(modules: dict[str, tuple[Path, bool]]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name or None, line) for every import of a module of the package."""
    found = []
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [(source, alias.name) for alias in node.names]
            else:
                continue
            for source, name in targets:
                if source != PACKAGE and not source.startswith(PACKAGE + "."):
                    continue
                # `from pkg import submodule` imports the submodule; otherwise the name lives in `source`
                target = f"{source}.{name}" if name and f"{source}.{name}" in modules else source
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    imported = None if target != source else name
                    found.append((module, target, imported, node.lineno))
    return found


def _part(module: str) -> str | None:
    """The subpackage (or top-level module) a module belongs to; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


MODULES = _modules()
IMPORTS = _imports(MODULES)


def test_every_subpackage_has_a_layer():
    parts = {_part(module) for module in MODULES} - {None}
    assert parts <= set(RANK), f"add these to LAYERS in tests/test_layering.py: {sorted(parts - set(RANK))}"


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for importer, target, _, _ in IMPORTS:
        edges.setdefault(importer, set()).add(target)
    cycles = _cycles(edges)
    lines = []
    for component in cycles:
        members = set(component)
        lines.append("cycle: " + ", ".join(component))
        lines += sorted(
            {
                f"  {importer} -> {target} (line {line})"
                for importer, target, _, line in IMPORTS
                if importer in members and target in members
            }
        )
    if cycles:
        pytest.fail("import cycles (function-level imports count):\n" + "\n".join(lines), pytrace=False)


def test_imports_flow_down_the_layers():
    upward = sorted(
        {
            f"{importer} -> {target} (line {line})"
            for importer, target, _, line in IMPORTS
            if _part(importer) is not None
            and _part(target) is not None
            and _part(importer) != _part(target)
            and RANK[_part(importer)] < RANK[_part(target)]
        }
    )
    if upward:
        pytest.fail("imports against the layer order (LAYERS in tests/test_layering.py):\n" + "\n".join(upward), pytrace=False)


def test_no_private_names_across_modules():
    private = sorted(
        f"{importer} imports {name} from {target} (line {line})"
        for importer, target, name, line in IMPORTS
        if name and name.startswith("_") and not name.startswith("__")
    )
    if private:
        pytest.fail("private names imported from another module (make them public):\n" + "\n".join(private), pytrace=False)


def test_subpackages_on_one_row_import_each_other_one_way():
    edges: dict[str, set[str]] = {}
    for importer, target, _, _ in IMPORTS:
        a, b = _part(importer), _part(target)
        if a is not None and b is not None and a != b and RANK[a] == RANK[b]:
            edges.setdefault(a, set()).add(b)
    cycles = _cycles(edges)
    if cycles:
        lines = sorted(
            f"{importer} -> {target} (line {line})"
            for importer, target, _, line in IMPORTS
            if any({_part(importer), _part(target)} <= set(c) and _part(importer) != _part(target) for c in cycles)
        )
        pytest.fail("subpackages of one row import each other both ways:\n" + "\n".join(lines), pytrace=False)
