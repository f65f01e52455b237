"""The house rules that keep medseg readable: imports point down, no cycles, short functions.

Every ``import`` in ``medseg/`` is read with ``ast`` (module level, inside functions and under
``TYPE_CHECKING`` alike) and checked against the layer map of ``../shared/DESIGN.md``. Cycles
are runtime cycles: an import under ``if TYPE_CHECKING:`` (a type annotation) never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "medseg"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "errors", "params", "registry", "resources", "transport", "collective", "threads"),
    ("io",),
    ("metrics", "nets"),
    ("inference",),
    ("training", "export"),
    ("tracking",),
    ("runner",),
    ("stages",),
    ("api", "demo", "mlflow", "__init__"),
    ("orthanc",),
    ("cli",),
)
"""Lowest first: a module may import its own layer and the layers below it, never above.

The library layers (io … export) know nothing of tracking, caching or stages.
"""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS; add it where it belongs")


def _imports(path: Path, module: str, *, typing: bool = True) -> set[str]:
    """The medseg modules ``path`` imports (``from medseg.x import y`` counts y when a module).

    ``typing=False`` leaves out the imports under ``if TYPE_CHECKING:``.
    """
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = set()
    if not typing:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("medseg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            if not base.startswith("medseg"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _exists(candidate) else base)
    return {name for name in found if name != module}


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _graph(*, typing: bool = True) -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path, _module_name(path), typing=typing)
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if target != "medseg" and _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph(typing=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    # ``medseg/__init__`` re-exports the API; importing ``medseg.x`` never needs it back.
    assert [cycle for cycle in cycles if "medseg" not in cycle] == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("from medseg.stages import REGISTRY\nimport medseg.cli\n")
    assert _imports(source, "medseg.io.probe") == {"medseg.stages", "medseg.cli"}
    assert _layer("medseg.cli") > _layer("medseg.io.probe")
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import medseg.cli\n")
    assert _imports(source, "medseg.io.probe") == {"medseg.cli"}
    assert _imports(source, "medseg.io.probe", typing=False) == set()


@pytest.mark.parametrize("module", ["runner/engine.py", "training/loop.py"])
def test_engine_and_loop_functions_are_short(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    sizes = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None
    }
    assert max(sizes.values()) < 60, sorted(sizes.items(), key=lambda item: -item[1])[:3]
