"""Module map of the project: one line per module of server/ and index/, with the project modules it imports.

    python tools/modmap.py [--stats]

Reads the source with ``ast`` (nothing is imported, so it runs without the dependencies). Imports inside
functions count too (they are the lazy GPU paths and CLI commands). ``--stats`` adds totals: modules,
import edges, and edges that climb from a lower layer to a higher one (see LAYERS).
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "index")
# The one-way flow, top to bottom: a module may import its own layer and the ones below it. The longest
# prefix decides; a module no prefix names is not ranked (entry points: server.__main__, server.cli).
LAYERS = {
    "server.cli": 7, "server.__main__": 7,
    "server.http": 6,
    "server.wiring": 5, "server.core": 5,
    "server.vision": 4,
    "server.modelbuild": 3, "server.inference": 3,
    "server.storage": 2, "index": 2,
    # leaves every layer may import: settings, the Prometheus series, and the model-repository
    # contract (model and tensor names, the embedding width; it imports nothing)
    "server.config": 1, "server.metrics": 1, "server.inference.names": 1, "server": 1,
}


def layer(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    best = None
    for prefix, rank in layers.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank)
    return best[1] if best else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        # the longest known module that prefixes the target
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(name, is_package, node)
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                add(full if full in known else base)
    return out


def import_map(root: Path = ROOT, known: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """Every module of the project (`known`: modules(root) when not given) and the project modules it
    imports, sorted."""
    known = modules(root) if known is None else known
    return {name: sorted(imports_of(name, path, known)) for name, path in known.items()}


def climbing(graph: dict[str, list[str]]) -> list[str]:
    """The imports that go from a lower layer up to a higher one, as "importer -> imported"."""
    out = []
    for name, deps in graph.items():
        mine = layer(name)
        out += [f"{name} -> {d}" for d in deps if mine is not None and (layer(d) or 0) > mine]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", action="store_true", help="totals, and every import that climbs a layer")
    args = parser.parse_args()
    known = modules()
    graph = import_map(known=known)
    climbs = climbing(graph)
    for name, deps in graph.items():
        lines = len(known[name].read_text().splitlines())
        print(f"{name} ({lines}) -> {', '.join(deps) if deps else '-'}")
    if args.stats:
        edges = sum(len(deps) for deps in graph.values())
        print(f"# {len(known)} modules, {edges} import edges, {len(climbs)} climbing a layer", file=sys.stderr)
        for climb in climbs:
            print(f"#   climbs: {climb}", file=sys.stderr)


if __name__ == "__main__":
    main()
