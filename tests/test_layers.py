"""The package's layers, checked from the source (imports parsed with `ast`, nothing imported):

    api -> generation -> messages <- actors -> engine;  distributed beside engine

- `engine/` imports neither trio nor quart (plain synchronous code on the MLX thread);
- `api/` never imports mlx (the HTTP layer only sends messages);
- `generation/` imports no quart (the dialect-neutral path knows nothing of HTTP);
- `distributed/` imports neither `api/` nor `actors/`;
- no import cycles anywhere in `mlx_server` (imports under `if TYPE_CHECKING:` count too: a
  cycle of types is still a cycle of knowledge).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_server"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def imports() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports (absolute names)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                found.add(module)
                # `from . import x` may name a submodule.
                found.update(f"{module}.{alias.name}" for alias in node.names)
        out[name] = found
    return out


def _internal(name: str) -> str | None:
    """The package module an imported name refers to (the longest known prefix)."""
    known = imports()
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for module, names in sorted(imports().items()):
        if _layer(module) != layer:
            continue
        for name in sorted(names):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{module} imports {name}")
    return bad


def test_the_package_is_parsed() -> None:
    assert {
        "mlx_server.api.app",
        "mlx_server.generation.prepare",
        "mlx_server.engine.model",
    } <= set(imports())


def test_engine_imports_no_trio_or_quart() -> None:
    assert _violations("engine", ("trio", "quart", "quart_trio", "hypercorn")) == []


def test_api_imports_no_mlx() -> None:
    assert _violations("api", ("mlx", "mlx_lm", "mlx_server.engine")) == []


def test_generation_imports_no_quart() -> None:
    assert _violations("generation", ("quart", "quart_trio", "hypercorn", "mlx_server.api")) == []


def test_distributed_imports_neither_api_nor_actors() -> None:
    assert _violations("distributed", ("mlx_server.api", "mlx_server.actors")) == []


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, names in imports().items():
        targets = {t for n in names if (t := _internal(n)) is not None and t != module}
        # A package's __init__ importing its own submodules is how packages re-export names.
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
