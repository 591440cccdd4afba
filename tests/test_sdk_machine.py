"""A client machine: the SDK installed alone (no torch, no transformers) from a copy of the
repository into a fresh venv, as the README says. There the README's "Using it" snippet runs as
written against a server, the CLI finds the server's local key in its data dir, and the server
commands print the install hint instead of a traceback. Needs the package index for the SDK's own
dependencies (pip's cache serves them after the first run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the venv's pip install took 104 s under a load average of 13: its command and the first test (whose
# setup it is) get three times that and more
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", ".stillroom", "__pycache__", "*.egg-info", "build",
                                    "dist", ".pytest_cache", ".ruff_cache", "node_modules")


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=360, **kwargs)


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding `pip install <copy of the repository>` and nothing else."""
    root = tmp_path_factory.mktemp("sdk-machine")
    clone = root / "stillroom"
    shutil.copytree(ROOT, clone, ignore=NOT_COPIED)
    run([sys.executable, "-m", "venv", root / "venv"]).check_returncode()
    bin_dir = root / "venv" / "bin"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    installed = run([bin_dir / "pip", "install", "-q", clone], env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return bin_dir


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The SDK on another machine"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_the_sdk_alone_has_no_torch_and_server_commands_say_what_they_need(sdk_venv):
    probe = run([sdk_venv / "python", "-c", "import importlib.util as u; "
                 "print([m for m in ('torch', 'transformers', 'sqlalchemy') if u.find_spec(m)])"])
    assert probe.stdout.strip() == "[]", probe.stderr
    for command in (["serve", "--port", "0"], ["keys", "list"]):
        result = run([sdk_venv / "stillroom", *command])
        assert result.returncode != 0
        assert "needs stillroom[server]" in result.stderr and "Traceback" not in result.stderr, result.stderr
        clone = sdk_venv.parents[1] / "stillroom"   # pip installed from it: the index has no stillroom
        assert f"pip install '{clone}[server]'" in result.stderr, result.stderr
    version = run([sdk_venv / "stillroom", "--version"])
    assert version.returncode == 0 and version.stdout.startswith("stillroom ")


def test_the_readme_snippet_runs_as_written_on_the_sdk_alone(sdk_venv, server, tmp_path):
    env = {**os.environ, "STILLROOM_BASE_URL": server.address, "STILLROOM_API_KEY": server.local_api_key,
           "STILLROOM_CACHE_DIR": str(tmp_path / "cache")}
    code = readme_snippet() + "\nprint('tokenizer:', type(tokenizer).__name__)\n"
    result = run([sdk_venv / "python", "-c", code], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokenizer: FastTokenizer" in result.stdout


def test_the_cli_finds_the_local_key_in_the_data_dir(sdk_venv, server):
    env = {k: v for k, v in os.environ.items() if k != "STILLROOM_API_KEY"}
    without = run([sdk_venv / "stillroom", "runs", "list", "--base-url", server.address,
                   "--data-dir", server.config.data_dir / "elsewhere"], env=env)
    assert without.returncode != 0 and "local_api_key" in without.stderr, without.stderr
    found = run([sdk_venv / "stillroom", "runs", "list", "--base-url", server.address,
                 "--data-dir", server.config.data_dir], env=env)
    assert found.returncode == 0, found.stderr
    assert "runs from offset 0" in found.stdout
