"""External weights (Tinker's `save_weights_external`): a run's weights as the files other tools load.

A LoRA run exports as a PEFT adapter (`adapter_model.safetensors` + `adapter_config.json`, keys
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`, `target_modules` a list of module
names), which `PeftModel.from_pretrained`, vLLM's and SGLang's LoRA loaders and tinker-cookbook's
`build_hf_model` / `build_lora_adapter` read as they are; a full run exports as a Hugging Face
model folder. The export is the run's sampler snapshot with `base_model_name_or_path` naming the
base model (not a folder on this server). With age recipients every file is encrypted to them
and named `<file>.age`, as Tinker's exports are. This module knows files, not owners or URLs.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

from stillroom_server.engine.checkpoints import META_FILE
from stillroom_server.engine.errors import FailedPrecondition, InvalidInput

AGE_SUFFIX = ".age"
MAX_RECIPIENTS = 10
MAX_RECIPIENT_CHARS = 4096  # an SSH RSA-8192 public key is ~1,400 characters
ADAPTER_CONFIG = "adapter_config.json"


def recipients(strings: list[str] | None) -> list[Any]:
    """age recipients (native `age1...` keys or SSH public keys), parsed; refused if malformed, or
    if the server has no age implementation (the `pyrage` package)."""
    if not strings:
        return []
    if len(strings) > MAX_RECIPIENTS:
        raise InvalidInput(f"age_encryption_recipients: at most {MAX_RECIPIENTS}, got {len(strings)}")
    try:
        pyrage = _pyrage()
    except ImportError:
        raise FailedPrecondition("age_encryption_recipients: this server cannot encrypt exports (install "
                                 "the `pyrage` package beside it), export without recipients") from None
    parsed = []
    for i, text in enumerate(strings):
        if not isinstance(text, str) or not 0 < len(text) <= MAX_RECIPIENT_CHARS or not text.isprintable():
            raise InvalidInput(f"age_encryption_recipients[{i}]: not an age or SSH public key")
        kind = pyrage.ssh if text.startswith(("ssh-", "ecdsa-")) else pyrage.x25519
        try:
            parsed.append(kind.Recipient.from_str(text.strip()))
        except Exception:  # noqa: BLE001 - pyrage's RecipientError and parse errors alike
            raise InvalidInput(f"age_encryption_recipients[{i}]: {text[:40]!r}... is not an age "
                               "(age1...) or SSH public key") from None
    return parsed


def fill(source: Path, target: Path, base_model: str, encrypt_to: list[Any]) -> None:
    """Write the export of sampler snapshot `source` into `target` (a staging folder)."""
    for file in sorted(source.iterdir()):
        if not file.is_file() or file.name == META_FILE:
            continue
        if file.name == ADAPTER_CONFIG:
            config = json.loads(file.read_text())
            config["base_model_name_or_path"] = base_model
            plain = target / (file.name + ".plain" if encrypt_to else file.name)
            plain.write_text(json.dumps(config, indent=2, sort_keys=True))
        elif encrypt_to:
            plain = file
        else:
            shutil.copyfile(file, target / file.name)
            continue
        if encrypt_to:
            _pyrage().encrypt_file(str(plain), str(target / (file.name + AGE_SUFFIX)), encrypt_to)
            if plain.parent == target:
                plain.unlink()


def _pyrage() -> Any:
    """The age implementation (an optional dependency; its extension module ships no types)."""
    return importlib.import_module("pyrage")


def files(directory: Path) -> list[Path]:
    """An export's files for download (its meta file is the server's own)."""
    return sorted(f for f in directory.iterdir() if f.is_file() and f.name != META_FILE)
