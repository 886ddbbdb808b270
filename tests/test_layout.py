"""The package's layout: no import cycle, imports run from the lower floors up, pure-torch scores, short modules.

Imports are read with `ast` from the source, at module level and inside functions, plus `importlib.import_module`
calls with a constant name, so an import hidden in a function cannot hide a cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "datadiet"
MAX_LINES = 500

# Floors from the bottom up (DESIGN.md, "Which way imports run"): a module may import its own floor and the ones
# below, never a higher one. The longest matching prefix decides a module's floor.
FLOORS = {
    "datadiet.scores": 0,
    "datadiet.validation": 0,
    "datadiet.tasks": 1,
    "datadiet.provenance": 1,
    "datadiet.models": 1,
    "datadiet.model_sources": 1,
    "datadiet.language_models": 1,
    "datadiet.nets": 1,
    "datadiet.metrics": 1,
    "datadiet.data": 2,
    "datadiet.loading": 2,
    "datadiet.arguments": 2,
    "datadiet.engine": 3,
    "datadiet.selection": 3,
    "datadiet.trainer": 3,
    "datadiet.tracin": 3,
    "datadiet.hub": 4,
    "datadiet.scoring": 4,
    "datadiet.report": 4,
    "datadiet.curve": 4,
    "datadiet.cli": 5,
    "datadiet.__main__": 6,
}
THIRD_PARTY_ALLOWED_IN_SCORES = {"torch", "numpy"}
# Modules of one floor that must not import each other: the engine trains proxies through a function it is given
# (`datadiet.scoring` gives it the trainer's), so the trainer is free to use the engine's shard store.
APART = {"datadiet.engine": "datadiet.trainer"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[str]:
    """Every module name `name` imports (absolute), anywhere in the file."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - node.level + 1]
                module = ".".join(root + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call):
            function = node.func
            called = getattr(function, "attr", getattr(function, "id", ""))
            if called == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                target = str(node.args[0].value)
                if target.startswith(".") and len(node.args) > 1:
                    target = "datadiet" + target  # the package's own lazy table uses __name__ == "datadiet"
                names.append(target)
    return names


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # `from .x import y` names both x and x.y: keep the ones that are modules of the package.
        graph[name] = {target for target in _imports(name, path) if target in MODULES and target != name}
    return graph


def _floor(name: str) -> int | None:
    matches = [prefix for prefix in FLOORS if name == prefix or name.startswith(prefix + ".")]
    return FLOORS[max(matches, key=len)] if matches else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    # The reader must count what a function imports, or a cycle could hide in a function body.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from .data import x\n    import importlib\n    importlib.import_module('a.b')\n")
    assert set(_imports("datadiet.m", module)) >= {"datadiet.data", "datadiet.data.x", "a.b"}


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_every_module_has_a_floor_and_imports_run_upward():
    graph = _graph()
    unplaced = sorted(name for name in graph if name != "datadiet" and _floor(name) is None)
    assert not unplaced, f"modules with no floor in tests/test_layout.py FLOORS: {unplaced}"
    upward = [
        f"{name} (floor {_floor(name)}) imports {target} (floor {_floor(target)})"
        for name, targets in graph.items()
        if name != "datadiet"
        for target in targets
        if target != "datadiet" and _floor(target) > _floor(name)
    ]
    assert not upward


def test_the_engine_never_imports_the_trainer():
    crossings = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for low, high in APART.items()
        if name == low or name.startswith(low + ".")
        for target in targets
        if target == high or target.startswith(high + ".")
    ]
    assert not crossings


def test_nothing_imports_the_command_line():
    importers = sorted(
        name
        for name, targets in _graph().items()
        if not (name.startswith("datadiet.cli") or name == "datadiet.__main__")
        and any(target == "datadiet.cli" or target.startswith("datadiet.cli.") for target in targets)
    )
    assert not importers


def test_scores_are_pure_torch():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    leaks = []
    for name, path in MODULES.items():
        if not (name == "datadiet.scores" or name.startswith("datadiet.scores.")):
            continue
        for target in _imports(name, path):
            top = target.split(".")[0]
            inside = target == "datadiet.scores" or target.startswith("datadiet.scores.")
            if not inside and top not in stdlib and top not in THIRD_PARTY_ALLOWED_IN_SCORES:
                leaks.append(f"{name} imports {target}")
    assert not leaks


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


@pytest.mark.slow
def test_built_in_net_by_name_in_a_fresh_process(tmp_path):
    # Before the redesign, timm knew datadiet's small nets only once `datadiet.curve` had imported `datadiet.nets`,
    # so this command failed in a fresh process with "Unknown model (datadiet_tiny_net)".
    repo = SRC.parent
    command = [
        sys.executable, "-m", "datadiet", "score", "--config", "recipes/digits/score.yaml",
        "--model_name", "datadiet_tiny_net", "--seeds", "0", "--train_epochs", "0", "--methods", "el2n",
        "--output_dir", str(tmp_path / "scores"),
    ]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=repo, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from datasets import load_from_disk

    scored = load_from_disk(str(tmp_path / "scores" / "dataset"))
    assert "el2n" in scored.column_names and len(scored) == 1347
