"""Checkpoint paths and files: `stillroom://<run_id>/<kind>/<name>` <-> a directory in the data dir.

Every checkpoint is a directory of safetensors and JSON files, written under a temporary name and
renamed into place, so a reader never sees half a checkpoint. Nothing here is ever pickled. This
module knows the file layout, not who owns what (that is the store's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from stillroom_server.engine.errors import AlreadyExists, InvalidInput, NotFound

SCHEME = "stillroom://"
TINKER_SCHEME = "tinker://"  # the same checkpoints, named as the Tinker wire names them
SCHEMES = (SCHEME, TINKER_SCHEME)
EXTERNAL = "external_weights"  # Hugging Face / PEFT files for download (save_weights_external)
MODEL_KINDS = ("weights", "sampler_weights")  # what samplers, teachers and loads read
KINDS = (*MODEL_KINDS, EXTERNAL)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Run ids: `run-<hex>` from Stillroom's wire, `<session>:train:<n>` from Tinker's.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:-]{0,63}$")
META_FILE = "stillroom_checkpoint.json"


@dataclass(frozen=True)
class CheckpointPath:
    run_id: str
    kind: str
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @property
    def tinker_uri(self) -> str:
        return f"{TINKER_SCHEME}{self.run_id}/{self.kind}/{self.name}"


def check_name(name: str, field: str = "name") -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidInput(f"{field}: {name[:80]!r} is not a valid checkpoint name (1-128 characters "
                           "of letters, digits, '.', '_' and '-', not starting with a symbol, no '..')")
    return name


def spill_folder(spill_dir: Path, run_id: str) -> Path:
    """Where an engine writes a run it moved to disk (read back by the engine that restarts after a
    crash; the server looks there too, to know whether a lost run can come back exactly)."""
    return spill_dir / hashlib.sha1(run_id.encode()).hexdigest()


def is_path(name: str) -> bool:
    """Whether `name` is written as a checkpoint path (else it names a base model)."""
    return name.startswith(SCHEMES)


def parse(uri: str, field: str = "model_path") -> CheckpointPath:
    """`stillroom://` or `tinker://` + `<run_id>/<weights|sampler_weights|external_weights>/<name>`."""
    scheme = next((s for s in SCHEMES if uri.startswith(s)), None)
    if scheme is None:
        raise InvalidInput(f"{field}: '{uri[:120]}' is not a checkpoint path "
                           f"({SCHEME}<run_id>/<weights|sampler_weights>/<name>)")
    parts = uri[len(scheme):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS or not RUN_ID_PATTERN.match(parts[0]):
        raise InvalidInput(f"{field}: '{uri[:120]}' is not a checkpoint path "
                           f"({SCHEME}<run_id>/<weights|sampler_weights>/<name>)")
    return CheckpointPath(parts[0], parts[1], check_name(parts[2], field))


class CheckpointFiles:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "checkpoints"

    def directory(self, path: CheckpointPath) -> Path:
        return self.root / path.run_id / path.kind / path.name

    def exists(self, path: CheckpointPath) -> bool:
        return (self.directory(path) / META_FILE).exists()

    def write(self, path: CheckpointPath, meta: dict, fill: Callable[[Path], None]) -> int:
        """Create the checkpoint with `fill(staging_dir)`, then rename it into place; return its size."""
        target = self.directory(path)
        if target.exists():
            raise AlreadyExists(f"name: checkpoint {path.uri} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=target.parent))
        try:
            fill(staging)
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))
            for file in staging.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            os.rename(staging, target)
            _fsync_directory(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return sum(f.stat().st_size for f in target.iterdir())

    def remove_partial(self) -> int:
        """Delete staging folders a crash left behind (never visible as checkpoints)."""
        partial = list(self.root.glob("*/*/.*")) if self.root.exists() else []
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        return len(partial)

    def latest(self, run_id: str, kind: str) -> CheckpointPath | None:
        """The run's most recently written complete checkpoint of `kind`, if any."""
        folder = self.root / run_id / kind
        done = ([d for d in folder.glob("*") if not d.name.startswith(".") and (d / META_FILE).exists()]
                if folder.exists() else [])
        if not done:
            return None
        newest = max(done, key=lambda d: (d / META_FILE).stat().st_mtime)
        return CheckpointPath(run_id, kind, newest.name)

    def read_meta(self, path: CheckpointPath) -> dict:
        if not self.exists(path):
            raise NotFound(f"model_path: checkpoint {path.uri} does not exist")
        return json.loads((self.directory(path) / META_FILE).read_text())

    def delete(self, path: CheckpointPath) -> None:
        """Remove a checkpoint's directory: renamed aside first, so no reader sees half of it."""
        target = self.directory(path)
        if not target.exists():
            return
        doomed = Path(tempfile.mkdtemp(prefix=f".deleting.{path.name}.", dir=target.parent))
        os.rename(target, doomed / path.name)
        shutil.rmtree(doomed, ignore_errors=True)

    def files_of(self, path: CheckpointPath) -> list[Path]:
        """The checkpoint's files, in a stable order (what an archive of it holds)."""
        directory = self.directory(path)
        if not (directory / META_FILE).exists():
            raise NotFound(f"path: checkpoint {path.uri} does not exist")
        return sorted(f for f in directory.rglob("*") if f.is_file())

    def write_archive(self, path: CheckpointPath, out: BinaryIO) -> None:
        """Stream the checkpoint as an uncompressed tar whose one top-level folder is its name."""
        directory = self.directory(path)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for file in self.files_of(path):
                info = archive.gettarinfo(str(file), arcname=f"{path.name}/{file.relative_to(directory)}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(file, "rb") as handle:
                    archive.addfile(info, handle)


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable across a power cut, not just a process crash."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
