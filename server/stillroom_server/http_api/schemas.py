"""The JSON bodies of Tinker's HTTP API that this server reads, as pydantic models.

Only the fields the server acts on are declared; others (the SDK's `type` tags, telemetry extras)
are ignored, so newer SDKs that add fields keep working. `parse` turns a validation failure into
InvalidInput naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    user_metadata: Optional[dict[str, Any]] = None


class SessionRef(_Body):
    session_id: str


class FinishSession(_Body):
    reason: Optional[dict[str, Any]] = None
    detail: Optional[str] = None


class LoraConfig(_Body):
    rank: int = 32
    seed: Optional[int] = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Body):
    type: str = "adamw"


class CreateModel(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: Optional[dict[str, Any]] = None
    lora_config: Optional[LoraConfig] = None
    optimizer_config: Optional[OptimizerConfig] = None


class ModelRef(_Body):
    model_id: str


class AdamParams(_Body):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class OptimStep(_Body):
    model_id: str
    seq_id: int
    adam_params: Optional[AdamParams] = None
    optimizer_params: Optional[dict[str, Any]] = None


class SaveWeights(_Body):
    model_id: str
    seq_id: int
    path: Optional[str] = None
    ttl_seconds: Optional[int] = None
    overwrite: bool = False
    user_metadata: Optional[dict[str, str]] = None


class SaveWeightsForSampler(_Body):
    model_id: str
    seq_id: int
    path: Optional[str] = None
    sampling_session_seq_id: Optional[int] = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    ttl_seconds: Optional[int] = None
    user_metadata: Optional[dict[str, str]] = None


class LoadWeights(_Body):
    path: str
    optimizer: bool = False
    model_id: Optional[str] = None
    seq_id: Optional[int] = None
    session_id: Optional[str] = None
    model_seq_id: Optional[int] = None
    base_model: Optional[str] = None
    user_metadata: Optional[dict[str, Any]] = None
    weights_access_token: Optional[str] = None


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: Optional[str] = None
    model_path: Optional[str] = None


class RetrieveFuture(_Body):
    request_id: str
    allow_metadata_only: bool = False


class SetTtl(_Body):
    ttl_seconds: Optional[int] = None


class WeightsInfo(_Body):
    tinker_path: str
