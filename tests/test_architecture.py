"""The package's shape: layers only import downwards, no import cycles, no private cross-module imports,
configuration loaded at the edge only, and DVC stages that depend on every module their command imports.

Each rule is also run on a deliberately broken case, so a check that silently passes everything fails here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from tests.architecture import (
    LAYERS,
    closure,
    cycles,
    handler_imports,
    import_graph,
    modules,
    private_imports,
    uncovered,
    unlayered,
    upward_imports,
)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "loc2vec"


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


def test_every_module_belongs_to_a_layer(graph) -> None:
    g, _ = graph
    assert unlayered(g) == []
    assert {m.split(".")[1] for m in g if m.count(".") >= 1} == set(LAYERS)


def test_lower_layers_never_import_higher_ones(graph) -> None:
    _, found = graph
    assert upward_imports(found) == []


def test_no_import_cycles(graph) -> None:
    g, _ = graph
    assert cycles(g) == []


def test_no_private_imports_across_modules(graph) -> None:
    _, found = graph
    assert private_imports(found) == []


def test_subpackages_say_what_they_own() -> None:
    for layer in LAYERS:
        init = PACKAGE / layer / "__init__.py"
        doc = init.read_text().split('"""')[1] if '"""' in init.read_text() else ""
        assert "Owns" in doc or "owns" in doc, f"{init} must say what it owns"
        assert "May import" in doc, f"{init} must say what it may import"


def test_configuration_is_loaded_at_the_edge_only() -> None:
    """`load_params()` only in core/ (its definition) and cli/ (the edge); library code is given its config."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("core", "cli"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "load_params(" in line:
                calls.append(f"{rel}:{n}")
    assert calls == []


def test_the_checks_catch_a_broken_package(tmp_path: Path) -> None:
    """An upward import, a cycle, a private import and an unplaced module are each reported."""
    pkg = tmp_path / "pkg"
    for sub, files in {
        "core": {"a.py": "from pkg.raster import b\n", "c.py": "from pkg.core.d import _helper\n", "d.py": ""},
        "raster": {"b.py": "from pkg.core import a\n"},
        "extra": {"e.py": ""},
    }.items():
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
        for name, text in files.items():
            (pkg / sub / name).write_text(text)
    (pkg / "__init__.py").write_text("")
    g, found = import_graph(pkg)
    layers = ("core", "raster")
    assert upward_imports(found, layers) == ["pkg.core.a:1 imports pkg.raster.b (core < raster)"]
    assert cycles(g) == [["pkg.core.a", "pkg.raster.b"]]
    assert private_imports(found) == ["pkg.core.c:1 imports pkg.core.d._helper"]
    assert "pkg.extra.e" in unlayered(g, layers)


# ---------------------------------------------------------------- DVC code dependencies


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def _commands(spec: dict) -> list[str]:
    cmd = spec["cmd"]
    return [cmd] if isinstance(cmd, str) else list(cmd)


def _handlers() -> dict[str, object]:
    from loc2vec.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.get_default("func") for name, p in sub.choices.items()}


def _stage_code(spec: dict, graph, handlers) -> set[Path]:
    """The source files a stage's commands run: each command's own imports and the project loading, closed."""
    known = modules(PACKAGE)
    start = set(graph.successors("loc2vec.cli.project"))  # every command loads the project first
    for cmd in _commands(spec):
        m = re.match(r"^loc2vec\s+([a-z-]+)", cmd)
        assert m, f"stage command {cmd!r} is not a loc2vec command"
        func = handlers[m.group(1)]
        start |= handler_imports(known[func.__module__], func.__name__, "loc2vec", known)
    needed = {m for m in closure(graph, start) if not m.startswith("loc2vec.cli") and m != "loc2vec"}
    return {known[m] for m in needed}


def test_every_stage_depends_on_the_code_it_imports(graph) -> None:
    g, _ = graph
    handlers = _handlers()
    missing = {}
    for name, spec in _stages().items():
        code = _stage_code(spec, g, handlers)
        assert code, f"stage {name}: no code found"
        gaps = uncovered(code, spec.get("deps", []), REPO)
        if gaps:
            missing[name] = gaps
    assert missing == {}, f"dvc.yaml deps do not cover what these stages import: {missing}"


def test_the_dependency_check_catches_a_missing_folder(graph) -> None:
    """Without loc2vec/training, the embed stage's closure (the champion's weights) is uncovered."""
    g, _ = graph
    spec = _stages()["embed"]
    deps = [d for d in spec["deps"] if d != "loc2vec/training"]
    gaps = uncovered(_stage_code(spec, g, _handlers()), deps, REPO)
    assert "loc2vec/training/registry.py" in gaps and "loc2vec/training/model.py" in gaps
