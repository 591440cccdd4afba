"""Exporting downloaded checkpoints: merge a LoRA adapter into its base as a plain HF model.

Needs torch, transformers and peft, imported only when a function here is called (the base SDK
does not depend on them). It knows folders on this machine, not the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHECKPOINT_META = "stillroom_checkpoint.json"


def base_model_of(checkpoint_dir: str | os.PathLike) -> dict:
    """What the checkpoint says about its base: `base_model` (the server's name for it) and, for
    an adapter, `base_model_name_or_path` (the server-local folder or hub id PEFT recorded)."""
    directory = Path(checkpoint_dir)
    facts = {}
    if (directory / CHECKPOINT_META).exists():
        facts["base_model"] = json.loads((directory / CHECKPOINT_META).read_text()).get("base_model")
    if (directory / "adapter_config.json").exists():
        config = json.loads((directory / "adapter_config.json").read_text())
        facts["base_model_name_or_path"] = config.get("base_model_name_or_path")
    return facts


def merge_lora_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       base_model_dir: str | os.PathLike | None = None) -> Path:
    """Fold a PEFT LoRA adapter into its base model and save a plain Hugging Face model folder.

    `base_model_dir` is a local folder (or hub id) with the base model; by default the one the
    adapter recorded. The base's tokenizer is saved alongside when it has one.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json); "
                         "full checkpoints are already plain Hugging Face model folders")
    base = base_model_dir or base_model_of(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ValueError("merge_lora_adapter: give base_model_dir (the adapter names no base)")
    if not Path(base).exists() and Path(str(base)).is_absolute():
        raise ValueError(f"the adapter's base folder {base} is not on this machine (it is the "
                         "server's); pass base_model_dir")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(out_dir)
    except (OSError, ValueError):
        pass  # a base without tokenizer files: the weights alone are still a model
    return out_dir
