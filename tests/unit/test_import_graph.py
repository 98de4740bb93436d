"""The import graph of `src/latentforge`: no cycles, and no module imports a layer above its own.

Layers, bottom to top (docs: /work/shared/ARCHITECTURE.md, issue 14 item 4):
errors -> models, sampling, prompts, data, distributed -> checkpoints -> model, pipelines -> evaluation,
training -> api, cli, server. Imports inside functions and under `TYPE_CHECKING` count the same as top-level
ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import latentforge

ROOT = Path(latentforge.__file__).resolve().parent
PACKAGE = "latentforge"

LAYERS = {
    "errors": 0,
    "models": 1,
    "sampling": 1,
    "prompts": 1,
    "data": 1,
    "distributed": 1,  # torchrun set-up, ranks, collectives: shared by training and sharded generation
    "checkpoints": 2,
    "backends": 2,  # compiled U-Net runners (openvino): use models, held by the model bundle
    "model": 3,
    "pipelines": 3,
    "evaluation": 4,
    "training": 4,
    "api": 5,
    "cli": 5,
    "server": 5,  # the HTTP server (`latentforge serve`): calls the pipelines; only cli.py starts it
    "__init__": 5,  # `latentforge.load` and friends: the public facade
    "__main__": 5,
    "assets": 0,
}

# Imports that break the layering today in files owned by other work; each names the issue that removes it.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module a dotted import name refers to (`pkg.mod.attr` -> `pkg.mod`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every latentforge module `module` imports, wherever the import statement stands."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            names = [f"{prefix}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: its package {top!r} has no layer in LAYERS (add it there)"
    return LAYERS[top]


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {module: _imports(module, path, known) for module, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return components


def test_the_graph_sees_function_level_and_relative_imports():
    graph = _graph()
    assert "latentforge.models.unet" in graph["latentforge.model"]
    assert len(graph) > 50


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (break each by moving the shared code down a layer):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_module_imports_a_layer_above_its_own():
    graph = _graph()
    violations = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module) and (module, target) not in KNOWN_EXCEPTIONS
    )
    assert not violations, "upward imports:\n" + "\n".join(
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})" for m, t in violations
    )
    stale = {pair for pair in KNOWN_EXCEPTIONS if pair[1] not in graph.get(pair[0], set())}
    assert not stale, f"known exceptions that no longer exist (remove them): {sorted(stale)}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
