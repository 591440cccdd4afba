"""tinker-cookbook 0.6.1 against Stillroom's SDK in place of `tinker`: every name the cookbook's
sources take from `tinker` or `tinker.types` exists in `stillroom`, and with
`stillroom.install_as_tinker()` every cookbook training module that imports with the real
`tinker` imports with Stillroom's SDK (each side in its own interpreter); and the cookbook's own
checkpoint helpers (save with a TTL, find the last checkpoint, read the renderer from the run's
metadata by tinker path, resume) run unmodified on a real server through Stillroom's SDK."""

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
    assert COOKBOOK is not None and COOKBOOK.origin is not None
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


# Tinker-cookbook's own checkpoint helpers, unmodified, over Stillroom's gRPC SDK.
COOKBOOK_CHECKPOINTS = r"""
import json, os, sys
import stillroom
stillroom.install_as_tinker()
import tinker
from tinker_cookbook import checkpoint_utils

service = tinker.ServiceClient(base_url=os.environ["ADDRESS"], api_key=os.environ["KEY"])
trainer = service.create_lora_training_client(
    "stillroom/char-1m", rank=4, user_metadata={checkpoint_utils.RENDERER_NAME_METADATA_KEY: "role_colon"}
).result()
log_path = sys.argv[1]
paths = checkpoint_utils.save_checkpoint(trainer, "step-1", log_path, {"batch": 1}, kind="both",
                                         ttl_seconds=3600)
last = checkpoint_utils.get_last_checkpoint(log_path)
renderer = checkpoint_utils.get_renderer_name_from_checkpoint(service, paths["sampler_path"])
resumed = service.create_training_client_from_state_with_optimizer(last.state_path).result()
listed = service.create_rest_client().list_checkpoints(trainer.model_id).result().checkpoints
print(json.dumps({"paths": paths, "last": last.state_path, "renderer": renderer,
                  "resumed_base": resumed.get_info().model_data.model_name,
                  "expiring": sorted(c.checkpoint_id for c in listed if c.expires_at is not None)}))
service.close("success")
"""


def test_the_cookbooks_checkpoint_helpers_run_on_stillroom_as_tinker(server, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADDRESS": server.address, "KEY": server.local_api_key}
    done = subprocess.run([sys.executable, "-c", COOKBOOK_CHECKPOINTS, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["last"] == out["paths"]["state_path"] and "/weights/step-1" in out["last"]
    assert out["renderer"] == "role_colon" and out["resumed_base"] == "stillroom/char-1m"
    assert out["expiring"] == ["sampler_weights/step-1", "weights/step-1"]
