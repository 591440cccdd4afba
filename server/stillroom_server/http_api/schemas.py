"""The JSON bodies of Tinker's HTTP API that this server reads, as pydantic models.

Only the fields the server acts on are declared; others (the SDK's `type` tags, telemetry extras)
are ignored, so newer SDKs that add fields keep working. `parse` turns a validation failure into
InvalidInput naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stillroom import types
from stillroom_server.core.errors import InvalidInput


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def parse(model: type[_Body], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidInput(f"{field}: {first['msg']}") from None


class CreateSession(_Body):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None


class SessionRef(_Body):
    session_id: str


class FinishSession(_Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraConfig(_Body):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Body):
    type: str = "adamw"


class CreateModel(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class ModelRef(_Body):
    model_id: str


class AdamParams(types.AdamParams):
    """The SDK's own AdamParams (one home for Tinker's defaults), reading a body leniently."""

    model_config = ConfigDict(extra="ignore")


class OptimStep(_Body):
    model_id: str
    seq_id: int
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(_Body):
    model_id: str
    seq_id: int
    path: str | None = None
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSampler(_Body):
    model_id: str
    seq_id: int
    path: str | None = None
    sampling_session_seq_id: int | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] | None = None


class LoadWeights(_Body):
    path: str
    optimizer: bool = False
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    weights_access_token: str | None = None


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class RetrieveFuture(_Body):
    request_id: str
    allow_metadata_only: bool = False


class SetTtl(_Body):
    ttl_seconds: int | None = None


class WeightsInfo(_Body):
    tinker_path: str
