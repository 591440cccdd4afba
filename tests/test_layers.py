"""The server's layers, read from its imports: a wire adaptor does not import the other wire, and
core imports neither wire nor a web or RPC framework (what both wires need, such as checkpoint
download tokens, lives in core)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "server" / "stillroom_server"


def imports_of(folder: str) -> dict[str, set[str]]:
    """Each module under `folder` -> the modules it imports (absolute names, any nesting)."""
    found: dict[str, set[str]] = {}
    for path in sorted((SERVER / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(SERVER))] = names
    return found


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module} imports {name}" for module, names in imports_of(folder).items()
            for name in sorted(names) if name.split(".")[0] in forbidden or name.startswith(forbidden)]


@pytest.mark.parametrize(("folder", "other"), [("grpc_api", "stillroom_server.http_api"),
                                               ("http_api", "stillroom_server.grpc_api")])
def test_a_wire_does_not_import_the_other(folder, other):
    assert offenders(folder, (other,)) == []


def test_core_imports_no_wire():
    wires = ("stillroom_server.http_api", "stillroom_server.grpc_api", "grpc", "grpc_health",
             "starlette", "fastapi", "uvicorn", "httpx")
    assert offenders("core", wires) == []
