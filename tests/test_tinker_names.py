"""tinker-cookbook 0.6.1 against Stillroom's SDK in place of `tinker`: every name the cookbook's
sources take from `tinker` or `tinker.types` exists in `stillroom`, and with
`stillroom.install_as_tinker()` every cookbook training module that imports with the real
`tinker` imports with Stillroom's SDK (each side in its own interpreter)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import stillroom

COOKBOOK = importlib.util.find_spec("tinker_cookbook")
pytestmark = pytest.mark.skipif(COOKBOOK is None, reason="tinker-cookbook is not installed")

# Imports every training module (and the loop recipes) and prints {module: error or null}.
PROBE = r"""
import importlib, json, pathlib, sys
if sys.argv[1] == "stillroom":
    import stillroom
    stillroom.install_as_tinker()
root = pathlib.Path(importlib.util.find_spec("tinker_cookbook").origin).parent
names = sorted({str(p.relative_to(root.parent))[:-3].replace("/", ".")
                for p in [*root.rglob("*train*.py"), *root.glob("recipes/*_loop.py")]
                if "tests" not in p.parts})
out = {}
for name in names:
    try:
        importlib.import_module(name)
        out[name] = None
    except BaseException as error:
        out[name] = f"{type(error).__name__}: {error}"[:300]
tinker = sys.modules.get("tinker")
out["<tinker is>"] = getattr(tinker, "__name__", None)
print(json.dumps(out))
"""


def cookbook_sources() -> list[Path]:
    return [p for p in Path(COOKBOOK.origin).parent.rglob("*.py") if "tests" not in p.parts]


def names_taken_from_tinker() -> tuple[set[str], set[str]]:
    """(names used from `tinker`, names used from `tinker.types`) across the cookbook's sources."""
    top, from_types = set(), set()
    for path in cookbook_sources():
        tree = ast.parse(path.read_text())
        tinker_names, types_names = {"tinker"}, set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "tinker":
                for alias in node.names:
                    (types_names if alias.name == "types" else top).add(alias.name)
                    if alias.name == "types":
                        types_names.add(alias.asname or "types")
            elif isinstance(node, ast.ImportFrom) and node.module == "tinker.types":
                from_types.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "tinker":
                        tinker_names.add(alias.asname or "tinker")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in tinker_names:
                top.add(node.attr)
            elif isinstance(node.value, ast.Name) and node.value.id in types_names:
                from_types.add(node.attr)
            elif (isinstance(node.value, ast.Attribute) and node.value.attr == "types"
                  and isinstance(node.value.value, ast.Name) and node.value.value.id in tinker_names):
                from_types.add(node.attr)
    top.discard("types")
    return top, from_types - {"types"}


def test_every_name_the_cookbook_takes_from_tinker_exists_in_stillroom():
    top, from_types = names_taken_from_tinker()
    assert len(top) > 20 and len(from_types) > 5  # the scan found the cookbook's uses
    assert sorted(n for n in top if not hasattr(stillroom, n)) == []
    assert sorted(n for n in from_types if not hasattr(stillroom.types, n)) == []


def probe(which: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, which], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_cookbooks_training_modules_import_with_stillroom_as_tinker():
    real, ours = probe("tinker"), probe("stillroom")
    assert real.pop("<tinker is>") == "tinker" and ours.pop("<tinker is>") == "stillroom"
    importable = [name for name, error in real.items() if error is None]
    assert len(importable) >= 20, real  # the training modules the installed extras allow
    assert {name: ours[name] for name in importable if ours[name] is not None} == {}
    # modules that need extras not installed here fail the same way with either
    assert {n for n, e in ours.items() if e} == {n for n, e in real.items() if e}
