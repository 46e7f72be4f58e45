"""Static checks of the package's shape: layers, import cycles, private imports, and DVC code dependencies.

Everything here reads source files (an AST walk); nothing is imported, so a check also works on a broken
tree. Imports anywhere in a module count, including those inside functions and under TYPE_CHECKING:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

# Low → high; a module may import its own subpackage and any lower one, never a higher one.
LAYERS: tuple[str, ...] = (
    "core",
    "orchestration",
    "osm",
    "raster",
    "sampling",
    "training",
    "embedding",
    "serving",
    "evaluation",
    "explore",
    "cli",
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. loc2vec.raster.cutter
    target: str  # imported module, e.g. loc2vec.raster.metatiles
    names: tuple[str, ...]  # names taken with `from target import …` (empty for `import target`)
    line: int


def module_name(path: Path, package_root: Path) -> str:
    """loc2vec/raster/cutter.py → loc2vec.raster.cutter (package_root is the folder holding `loc2vec`)."""
    parts = list(path.relative_to(package_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package_dir: Path) -> dict[str, Path]:
    """Every module of a package directory, by dotted name."""
    root = package_dir.parent
    return {module_name(p, root): p for p in sorted(package_dir.rglob("*.py")) if "static" not in p.parts}


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(path: Path, name: str, known: Mapping[str, Path], package: str) -> list[Import]:
    """The imports of one module that name modules of `package` (resolved to modules, not attributes)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[Import] = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    out.append(Import(name, alias.name, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node)
            if target.split(".")[0] != package:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:  # `from loc2vec.raster import metatiles`: the submodule is imported
                    out.append(Import(name, sub, (), node.lineno))
                else:
                    out.append(Import(name, target, (alias.name,), node.lineno))
    return out


def import_graph(package_dir: Path) -> tuple[nx.DiGraph, list[Import]]:
    """Module → module edges of a package, and every import behind them."""
    known = modules(package_dir)
    package = package_dir.name
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    found: list[Import] = []
    for name, path in known.items():
        for imp in imports(path, name, known, package):
            target = imp.target if imp.target in known else imp.target.rsplit(".", 1)[0]
            if target in known and target != name:
                graph.add_edge(name, target)
                found.append(imp)
    return graph, found


def layer_of(module: str, layers: Sequence[str]) -> int | None:
    """The layer index of loc2vec.<layer>.…; None for the package root (loc2vec/__init__.py)."""
    parts = module.split(".")
    return layers.index(parts[1]) if len(parts) > 1 and parts[1] in layers else None


def upward_imports(found: Iterable[Import], layers: Sequence[str] = LAYERS) -> list[str]:
    """Imports of a higher layer by a lower one, as readable lines."""
    bad = []
    for imp in found:
        src, dst = layer_of(imp.source, layers), layer_of(imp.target, layers)
        if src is not None and dst is not None and dst > src:
            bad.append(f"{imp.source}:{imp.line} imports {imp.target} ({layers[src]} < {layers[dst]})")
    return bad


def unlayered(graph: nx.DiGraph, layers: Sequence[str] = LAYERS) -> list[str]:
    """Modules outside every layer (a new flat module or subpackage must be given its place)."""
    return sorted(m for m in graph if m.count(".") >= 1 and layer_of(m, layers) is None)


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    """Every strongly connected group of modules that import each other (directly or not)."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def private_imports(found: Iterable[Import]) -> list[str]:
    """`from other_module import _name`: a module reaching into another one's private helpers."""
    return [
        f"{imp.source}:{imp.line} imports {imp.target}.{n}"
        for imp in found
        for n in imp.names
        if n.startswith("_") and not n.startswith("__") and imp.target != imp.source
    ]


# ---------------------------------------------------------------- DVC code dependencies


def closure(graph: nx.DiGraph, start: Iterable[str]) -> set[str]:
    """The modules `start` needs: themselves and everything they import, transitively."""
    out: set[str] = set()
    for s in start:
        if s in graph:
            out |= {s} | nx.descendants(graph, s)
    return out


def handler_imports(cli_module: Path, function: str, package: str, known: Mapping[str, Path]) -> set[str]:
    """The package modules a CLI command's function imports (its lazy, function-level imports)."""
    tree = ast.parse(cli_module.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            found: set[str] = set()
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] == package:
                    for alias in inner.names:
                        sub = f"{inner.module}.{alias.name}"
                        found.add(sub if sub in known else inner.module or "")
                elif isinstance(inner, ast.Import):
                    found |= {a.name for a in inner.names if a.name.split(".")[0] == package}
            return found
    raise LookupError(f"no function {function} in {cli_module}")


def uncovered(files: Iterable[Path], deps: Iterable[str], repo: Path) -> list[str]:
    """Files (relative to repo) that no dependency path (a file or a folder) covers."""
    dep_paths = [repo / d for d in deps]
    return sorted(str(f.relative_to(repo)) for f in files if not any(f == d or d in f.parents for d in dep_paths))
