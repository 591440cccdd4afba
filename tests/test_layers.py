"""The layers, read from the imports. In the server, a wire adaptor does not import the other wire,
and core imports neither wire nor a web or RPC framework (what both wires need, such as checkpoint
download tokens, lives in core). In the cookbook, the library never imports a recipe, and nothing
imports the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server" / "stillroom_server"
COOKBOOK = ROOT / "cookbook" / "stillroom_cookbook"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_of(folder: str, root: Path = SERVER, recursive: bool = True) -> dict[str, set[str]]:
    """Each module under `root / folder` -> the modules it imports (absolute names, any nesting)."""
    found: dict[str, set[str]] = {}
    where = root / folder
    for path in sorted(where.rglob("*.py") if recursive else where.glob("*.py")):
        names = _imports(path)
        found[str(path.relative_to(root))] = names
    return found


def offenders(folder: str, forbidden: tuple[str, ...], root: Path = SERVER,
              recursive: bool = True) -> list[str]:
    return [f"{module} imports {name}" for module, names in imports_of(folder, root, recursive).items()
            for name in sorted(names) if name.split(".")[0] in forbidden or name.startswith(forbidden)]


@pytest.mark.parametrize(("folder", "other"), [("grpc_api", "stillroom_server.http_api"),
                                               ("http_api", "stillroom_server.grpc_api")])
def test_a_wire_does_not_import_the_other(folder, other):
    assert offenders(folder, (other,)) == []


def test_core_imports_no_wire():
    wires = ("stillroom_server.http_api", "stillroom_server.grpc_api", "grpc", "grpc_health",
             "starlette", "fastapi", "uvicorn", "httpx")
    assert offenders("core", wires) == []


# What of the engine the service and the wires may import: its protocol (commands, the core's client
# interface), the plain types and errors commands carry, and the checkpoint paths and files every
# process shares. Never the machinery (engine.py, sampling, training, adapters, kernels, runtime).
ENGINE_PROTOCOL = ("stillroom_server.engine.protocol", "stillroom_server.engine.types",
                   "stillroom_server.engine.errors", "stillroom_server.engine.checkpoints")


@pytest.mark.parametrize("folder", ["core", "grpc_api", "http_api"])
def test_core_and_the_wires_import_only_the_engine_protocol(folder):
    engine = [f"{module} imports {name}" for module, names in imports_of(folder).items()
              for name in sorted(names) if name.startswith("stillroom_server.engine")
              and name != "stillroom_server.engine" and not name.startswith(ENGINE_PROTOCOL)]
    assert engine == []


def test_the_server_has_no_import_cycle():
    modules = {}
    for path in SERVER.rglob("*.py"):
        parts = ("stillroom_server", *path.relative_to(SERVER).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imported = {name: _imports(path) for name, path in modules.items()}
    graph = {name: {n for n in modules if n != name and n in imported[name]} for name in modules}
    seen: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for other in sorted(graph[name]):
            assert seen.get(other) != 1, "import cycle: " + " -> ".join([*path, name, other])
            if other not in seen:
                visit(other, [*path, name])
        seen[name] = 2

    for name in sorted(modules):
        if name not in seen:
            visit(name, [])


def test_the_cookbook_library_imports_no_recipe():
    assert (COOKBOOK / "recipes").is_dir()
    assert offenders(".", ("stillroom_cookbook.recipes",), COOKBOOK, recursive=False) == []


def test_the_cookbook_imports_no_server():
    assert offenders(".", ("stillroom_server",), COOKBOOK) == []
