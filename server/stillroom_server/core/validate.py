"""Checks on request fields that need no model: ranges, limits, names. Each raises InvalidInput (or
ResourceExhausted) naming the field and the rule; checks that need a model's facts are the engine's
`validate_*`. The service calls both before it accepts a request, so a refused one changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stillroom_server.core.errors import InvalidInput
from stillroom_server.engine.types import AdamConfig, ForwardBackwardWork

MAX_LORA_RANK = 512
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_METADATA_ENTRIES = 64
MAX_METADATA_CHARS = 4096
# Bounds every wire holds a request to before any of it reaches torch, the store or a log line.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_OFFSET = 2**31 - 1              # a list's offset (the store counts rows in int64; no list is longer)
MAX_TAGS = 64                       # a client session's tags
MAX_TAG_CHARS = 256
MAX_ID_CHARS = 256                  # ids of sessions, runs, samplers and requests
MAX_NAME_CHARS = 512                # base model names, checkpoint paths
MAX_STOP_SEQUENCES = 64             # stop strings or stop token ids of one sampling request
MAX_STOP_CHARS = 1024
MAX_TENSOR_DIMS = 2                 # loss inputs are [T] (or [T, K])
MAX_DECODED_ELEMENTS = 2**26        # values decoded from one request's tensors (256 MB as float32)
MAX_JSON_TENSOR_VALUES = 1 << 22    # values of one tensor sent as JSON


@dataclass(frozen=True)
class Limits:
    max_live_runs_per_owner: int = 32
    max_tokens_per_request: int = 4_000_000
    # bytes of weights and AdamW moments one owner's live runs may hold (in memory or moved to disk);
    # None: the engine's training-run memory budget, which the server states at start
    max_live_bytes_per_owner: int | None = None


def adam(config: AdamConfig) -> AdamConfig:
    checks = [
        ("learning_rate", config.learning_rate >= 0, ">= 0"),
        ("beta1", 0 <= config.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= config.beta2 < 1, "in [0, 1)"),
        ("eps", config.eps > 0, "> 0"),
        ("weight_decay", config.weight_decay >= 0, ">= 0"),
        ("grad_clip_norm", config.grad_clip_norm >= 0, ">= 0 (0 disables clipping)"),
    ]
    for name, ok, rule in checks:
        value = getattr(config, name)
        if not (math.isfinite(value) and ok):
            raise InvalidInput(f"adam_params.{name}: must be {rule}, got {value}")
    return config


def lora_rank(rank: int) -> int:
    if not 1 <= rank <= MAX_LORA_RANK:
        raise InvalidInput(f"lora.rank: must be between 1 and {MAX_LORA_RANK}, got {rank}")
    return rank


def seq(value: int) -> int:
    if not 1 <= value <= INT64_MAX:
        raise InvalidInput(f"seq: request numbers start at 1 and fit in int64, got {_short(value)}")
    return value


def token_count(work: ForwardBackwardWork, limits: Limits) -> None:
    tokens = sum(d.tokens_T.numel() for d in work.data)
    if tokens > limits.max_tokens_per_request:
        raise InvalidInput(f"data: {tokens} tokens is over the limit of {limits.max_tokens_per_request} "
                           "per request (the SDK splits larger calls into parts; lower "
                           "TrainingClient.max_chunk_bytes)")


def ttl_seconds(value: int | None, field: str = "ttl_seconds") -> int | None:
    """None means: never expires (both wires and the SDK agree; 0 is refused, not "forever")."""
    if value is None:
        return None
    if not 1 <= value <= MAX_TTL_SECONDS:
        raise InvalidInput(f"{field}: must be between 1 and {MAX_TTL_SECONDS} (or unset: never "
                           f"expires), got {value}")
    return value


def list_window(limit: int, offset: int) -> tuple[int, int]:
    limit = limit or DEFAULT_LIST_LIMIT
    if not 1 <= limit <= MAX_LIST_LIMIT or not 0 <= offset <= MAX_OFFSET:
        raise InvalidInput(f"limit: must be between 1 and {MAX_LIST_LIMIT} and offset between 0 and "
                           f"{MAX_OFFSET}, got limit {limit}, offset {_short(offset)}")
    return limit, offset


def tags(values: list[str]) -> list[str]:
    if len(values) > MAX_TAGS:
        raise InvalidInput(f"tags: at most {MAX_TAGS} tags, got {len(values)}")
    for value in values:
        if len(value) > MAX_TAG_CHARS:
            raise InvalidInput(f"tags: each tag at most {MAX_TAG_CHARS} characters, got {len(value)}")
    return list(values)


def text(value: str, field: str, limit: int = MAX_ID_CHARS) -> str:
    """A name or id from a request, bounded before anything looks it up or logs it."""
    if len(value) > limit:
        raise InvalidInput(f"{field}: at most {limit} characters, got {len(value)}")
    return value


def int64(value: int, field: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidInput(f"{field}: must fit in int64 [{INT64_MIN}, {INT64_MAX}], got {_short(value)}")
    return value


def _short(value: object) -> str:
    """A value as a reply may quote it: at most 40 characters (an integer of 10^30 digits is not
    worth echoing, and Python refuses to print one past 4,300)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def user_metadata(metadata: dict | None, field: str = "user_metadata") -> dict[str, str]:
    metadata = dict(metadata or {})
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidInput(f"{field}: at most {MAX_METADATA_ENTRIES} entries, got {len(metadata)}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput(f"{field}: keys and values must be strings, got {key!r}: {value!r}")
        if len(key) + len(value) > MAX_METADATA_CHARS:
            raise InvalidInput(f"{field}.{key[:40]}: entry over {MAX_METADATA_CHARS} characters")
    return metadata
