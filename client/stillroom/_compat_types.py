"""Types the Tinker SDK defines that Stillroom accepts for compatibility but mostly does not act
on: image and audio chunks (Stillroom's models read text tokens only; sending one is refused),
provenance spans, other optimizers' configs, and the shapes of services a self-hosted server does
not offer (audit log, external weights). Re-exported from `stillroom.types`.
"""

from __future__ import annotations

import base64
import dataclasses
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelID = str
RequestID = str
TensorDtype = Literal["int64", "float32"]
RequestErrorCategory = Literal["unknown", "server", "user"]
SamplingClientKind = Literal["snapshot", "inflight"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


def _b64(value: bytes | str) -> bytes:
    return base64.b64decode(value) if isinstance(value, str) else value


class ImageChunk(_Strict):
    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int | None = None
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def _decode(cls, value: bytes | str) -> bytes:
        return _b64(value)

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageChunk expected_tokens needs to be set in order to compute the length")
        return self.expected_tokens


class ImageAssetPointerChunk(_Strict):
    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageAssetPointerChunk expected_tokens needs to be set to compute the length")
        return self.expected_tokens


class DmelChunk(_Strict):
    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @field_validator("dmel", mode="before")
    @classmethod
    def _decode(cls, value: bytes | str) -> bytes:
        return _b64(value)

    @property
    def length(self) -> int:
        raise ValueError("DmelChunk: Stillroom's models read text tokens only")


# ---------------------------------------------------------------- provenance


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """Positions [offset, offset + length) of the prompt of the request that sampled `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """Positions [offset, offset + length) of the sampled tokens of `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


def _check_span(span: Any) -> None:
    name = type(span).__name__
    if span.length < 0:
        raise ValueError(f"{name}.length must be >= 0, got {span.length}")
    if not span.sequence_id:
        raise ValueError(f"{name}.sequence_id must be non-empty")
    if span.offset < 0:
        raise ValueError(f"{name}.offset must be >= 0, got {span.offset}")


ProvenanceSpans = list[PromptProvenanceSpan | SampledProvenanceSpan]


def check_tiling(kwarg: str, spans: ProvenanceSpans, expected_length: int) -> None:
    total = sum(span.length for span in spans)
    if total != expected_length:
        raise ValueError(f"with_provenance {kwarg} spans cover {total} positions but the field has "
                         f"{expected_length}; the runs must tile it exactly")


# ---------------------------------------------------------------- optimizers


class AdamOptimizerConfig(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["adamw"] = "adamw"


class DimuonOptimizerConfig(_Strict):
    """Accepted by the types; Stillroom's server trains with AdamW only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


OptimizerConfig = AdamOptimizerConfig | DimuonOptimizerConfig


class DimuonParams(_Strict):
    """Accepted by the types; an optim_step with them is refused (Stillroom runs AdamW)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["dimuon"] = "dimuon"
    learning_rate: float = Field(ge=0)
    grad_clip_norm: float = 0.0
    beta1: float = Field(default=0.9, ge=0, lt=1)


class ModelData(_Open):
    """What a training run's model is: `tokenizer_id` is what `get_tokenizer` loads."""

    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


# ---------------------------------------------------------------- services not offered


class AuditLogEntry(_Open):
    event_type: str | None = None
    time: datetime | None = None


class AuditLogResponse(_Open):
    entries: list[AuditLogEntry] = Field(default_factory=list)


class ExternalWeightsUrlsResponse(_Open):
    urls: list[str] = Field(default_factory=list)


class WeightsInfoResponse(_Open):
    base_model: str | None = None
    is_lora: bool | None = None
    lora_rank: int | None = None


class WhoamiResponse(_Open):
    user_id: str | None = None
