"""Fetches a model's tokenizer files from the server and loads them with transformers.

The files are cached under ~/.cache/stillroom/tokenizers (or $STILLROOM_CACHE_DIR) by content, so
a tokenizer is fetched once per process. transformers is needed here only, never at import.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from stillroom._proto import stillroom_pb2 as pb


def cache_dir() -> Path:
    root = os.environ.get("STILLROOM_CACHE_DIR") or Path.home() / ".cache" / "stillroom"
    return Path(root) / "tokenizers"


@functools.lru_cache(maxsize=None)
def _load_from_files(files: tuple[tuple[str, bytes], ...]) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError("get_tokenizer() needs transformers: pip install 'stillroom[cookbook]'") from error
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
    return AutoTokenizer.from_pretrained(str(target))


def load_tokenizer(connection: Any, base_model: str) -> Any:
    reply = connection.run(connection.call("GetTokenizer", pb.GetTokenizerRequest(base_model=base_model)))
    return _load_from_files(tuple(sorted(reply.files.items())))
