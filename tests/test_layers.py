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


def imports_of(folder: str, root: Path = SERVER, recursive: bool = True) -> dict[str, set[str]]:
    """Each module under `root / folder` -> the modules it imports (absolute names, any nesting)."""
    found: dict[str, set[str]] = {}
    where = root / folder
    for path in sorted(where.rglob("*.py") if recursive else where.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
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


def test_the_cookbook_library_imports_no_recipe():
    assert (COOKBOOK / "recipes").is_dir()
    assert offenders(".", ("stillroom_cookbook.recipes",), COOKBOOK, recursive=False) == []


def test_the_cookbook_imports_no_server():
    assert offenders(".", ("stillroom_server",), COOKBOOK) == []
