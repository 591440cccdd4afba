"""Fetches a model's tokenizer files from the server and loads them: with transformers where it is
installed (the full tokenizer, chat templates included), else with the `tokenizers` library alone
(an SDK dependency) on tokenizer.json: encode, decode and the special tokens, no chat templates.

The files are cached under ~/.cache/stillroom/tokenizers (or $STILLROOM_CACHE_DIR) by content, so
a tokenizer is fetched once per process. Neither library is imported until a tokenizer is asked for.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from stillroom._proto import stillroom_pb2 as pb

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def cache_dir() -> Path:
    root = os.environ.get("STILLROOM_CACHE_DIR") or Path.home() / ".cache" / "stillroom"
    return Path(root) / "tokenizers"


class FastTokenizer:
    """The part of a Hugging Face tokenizer that token-level training needs, from tokenizer.json
    and tokenizer_config.json (or special_tokens_map.json): `encode`, `decode`, `vocab_size` and
    `bos_token`/`bos_token_id` (likewise eos, pad, unk; None where the model has none)."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.name_or_path = str(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).exists():
                config.update(json.loads((folder / name).read_text()))
        for name in SPECIAL_TOKENS:
            token = config.get(name)
            text = token.get("content") if isinstance(token, dict) else token
            setattr(self, name, text)
            setattr(self, f"{name}_id", self._tokenizer.token_to_id(text) if text else None)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"FastTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


def _cached_folder(files: tuple[tuple[str, bytes], ...]) -> Path:
    digest = hashlib.sha256(b"".join(name.encode() + data for name, data in files)).hexdigest()[:16]
    target = cache_dir() / digest
    if not target.exists():
        staging = target.with_name(f".{digest}.{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (staging / name).write_bytes(data)
        try:
            staging.rename(target)
        except OSError:
            pass  # another process wrote the same files first
    return target


@functools.cache
def _load_from_files(files: tuple[tuple[str, bytes], ...]) -> Any:
    folder = _cached_folder(files)
    if importlib.util.find_spec("transformers") is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    if not (folder / "tokenizer.json").exists():
        raise ValueError("this model's tokenizer has no tokenizer.json, which the SDK alone reads: "
                         "install transformers to load it (pip install transformers)")
    return FastTokenizer(folder)


def load_tokenizer(connection: Any, base_model: str) -> Any:
    reply = connection.run(connection.call("GetTokenizer", pb.GetTokenizerRequest(base_model=base_model)))
    return _load_from_files(tuple(sorted(reply.files.items())))
