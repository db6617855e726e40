"""The shape of the code (DESIGN sec. 6, docs/architecture.md): every import points down through five layers,
and neither modules nor subpackages import each other in a circle. Read from the source (the AST), imports
inside functions included, so a lazy import cannot hide an arrow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "neuroimagen"

# layer of a module: the longest matching prefix wins
LAYERS = {
    "neuroimagen": "ground", "neuroimagen.config": "ground", "neuroimagen.errors": "ground",
    "neuroimagen.atomic": "ground", "neuroimagen.rundir": "ground",
    "neuroimagen.data": "core", "neuroimagen.models": "core", "neuroimagen.losses": "core",
    "neuroimagen.augment": "core", "neuroimagen.probe": "core", "neuroimagen.metrics": "core",
    "neuroimagen.training": "core", "neuroimagen.stages": "core", "neuroimagen.reconstruction": "core",
    "neuroimagen.frozen": "core",
    "neuroimagen.runs": "runs",
    "neuroimagen.distributed": "edge",
    "neuroimagen.backends": "face", "neuroimagen.cli": "face", "neuroimagen.api": "face",
}
# the package root re-exports the API's Run lazily (PEP 562 __getattr__): the one arrow allowed to point up
LAZY_EXPORTS = {("neuroimagen", "neuroimagen.api")}
RANK = {"ground": 0, "core": 1, "runs": 2, "edge": 3, "face": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> str:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports (anywhere in the file), resolved to modules that exist."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if resolve(f"{base}.{a.name}") == f"{base}.{a.name}" else base
                           for a in node.names]
            for t in targets:
                if t == "neuroimagen" or t.startswith("neuroimagen."):
                    r = resolve(t)
                    if r and r != mod:
                        graph[mod].add(r)
        graph.setdefault(mod, set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def subpackage(mod: str) -> str:
    """The folder a module lives in (``neuroimagen.stages.encoder`` -> ``neuroimagen.stages``)."""
    files = {module_name(p) for p in PKG.rglob("__init__.py")}
    return mod if mod in files else mod.rpartition(".")[0]


GRAPH = import_graph()


def test_the_graph_is_read_from_the_source():
    # a known function-level import and a known module-top one are both seen
    assert "neuroimagen.stages" in GRAPH["neuroimagen.runs.training"]
    assert "neuroimagen.distributed.train" in GRAPH["neuroimagen.backends"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_no_import_cycle_between_subpackages():
    folders: dict[str, set[str]] = defaultdict(set)
    for mod, deps in GRAPH.items():
        src = subpackage(mod)
        folders[src].update(subpackage(d) for d in deps if subpackage(d) != src and subpackage(d) != "neuroimagen")
    cycle = find_cycle(folders)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_point_down(mod):
    """A module imports only its own layer or the layers below (ground < core < runs < edge < face)."""
    up = sorted(d for d in GRAPH[mod] if RANK[layer(d)] > RANK[layer(mod)] and (mod, d) not in LAZY_EXPORTS)
    assert not up, f"{mod} ({layer(mod)}) imports {', '.join(f'{d} ({layer(d)})' for d in up)}"


def test_only_the_edge_imports_ray():
    offenders = []
    for p in PKG.rglob("*.py"):
        mod = module_name(p)
        if layer(mod) == "edge":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{mod}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders, offenders


def test_the_runs_layer_never_picks_ray_itself(tmp_path):
    """Asked for Ray without a Ray backend passed in, a runs function says so in one line and writes nothing
    (only neuroimagen.backends, the face, maps train.backend / eval.backend to Ray)."""
    from neuroimagen.config import load_config
    from neuroimagen.errors import ConfigError
    from neuroimagen.runs.evaluation import reconstruct
    from neuroimagen.runs.training import train

    with pytest.raises(ConfigError, match=r"train.backend: 'ray' needs its fitter passed in \(neuroimagen.backends"):
        train(load_config(None, ["train.backend=ray"]), tmp_path / "t", ["encoder"])
    with pytest.raises(ConfigError, match=r"eval.backend: 'ray' needs its runner passed in \(neuroimagen.backends"):
        reconstruct(load_config(None, ["eval.backend=ray"]), tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
