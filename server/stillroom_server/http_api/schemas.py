"""The JSON bodies of Tinker's HTTP API that this server reads, as pydantic models.

Only the fields the server acts on are declared; others (the SDK's `type` tags, telemetry extras)
are ignored, so newer SDKs that add fields keep working. Types are strict (an integer field takes
a JSON integer, not 1.5 or "1"), every integer fits int64 and every id and list is bounded, so
what passes `parse` is safe to hand to the core. `parse` turns a validation failure into
InvalidInput naming the field and the rule.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from stillroom import types
from stillroom_server.core import validate
from stillroom_server.core.errors import InvalidInput
from stillroom_server.engine.checkpoints import exports

Int64 = Annotated[int, Field(ge=validate.INT64_MIN, le=validate.INT64_MAX)]
Seq = Annotated[int, Field(ge=0, le=validate.INT64_MAX)]     # numbers a client counts (0: the first)
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]          # sizes and k's (the engine narrows them)
Id = Annotated[str, StringConstraints(max_length=validate.MAX_ID_CHARS)]
Name = Annotated[str, StringConstraints(max_length=validate.MAX_NAME_CHARS)]
Tag = Annotated[str, StringConstraints(max_length=validate.MAX_TAG_CHARS)]
MAX_PROMPT_TOKENS = 1 << 20        # one chunk's tokens; the engine then holds a prompt to the context


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True, allow_inf_nan=False)


def parse(model: type[BaseModel], body: Any, forms: dict[str, str] | None = None) -> Any:
    """`body` as `model`, or InvalidInput naming the field. Pydantic names a field of several forms
    by the last form it tried (`stop.constrained-str`); the path keeps only field names and indices,
    and where `forms` describes the field the refusal lists its forms instead."""
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        path = [str(part) for part in first["loc"] if isinstance(part, int) or str(part).isidentifier()]
        field = ".".join(path) or "body"
        if forms and path and len(path) < len(first["loc"]) and path[-1] in forms:
            raise InvalidInput(f"{field}: must be {forms[path[-1]]}") from None
        raise InvalidInput(f"{field}: {first['msg']}") from None


class CreateSession(_Body):
    tags: Annotated[list[Tag], Field(max_length=validate.MAX_TAGS)] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None


class SessionRef(_Body):
    session_id: Id


class FinishSession(_Body):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class LoraConfig(_Body):
    rank: Int64 = 32
    seed: Int64 | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Body):
    type: str = "adamw"


class CreateModel(_Body):
    session_id: Id
    model_seq_id: Seq
    base_model: Name
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class ModelRef(_Body):
    model_id: Id


class AdamParams(types.AdamParams):
    """The SDK's own AdamParams (one home for Tinker's defaults), reading a body leniently."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class OptimStep(_Body):
    model_id: Id
    seq_id: Int64
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(_Body):
    model_id: Id
    seq_id: Int64
    path: Name | None = None
    ttl_seconds: Int64 | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSampler(_Body):
    model_id: Id
    seq_id: Int64
    path: Name | None = None
    sampling_session_seq_id: Int64 | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    ttl_seconds: Int64 | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternal(_Body):
    model_id: Id
    seq_id: Int64
    path: Name
    ttl_seconds: Int64 | None = None
    age_encryption_recipients: Annotated[
        list[Annotated[str, StringConstraints(max_length=exports.MAX_RECIPIENT_CHARS)]],
        Field(max_length=exports.MAX_RECIPIENTS)] | None = None


class LoadWeights(_Body):
    path: Name
    optimizer: bool = False
    model_id: Id | None = None
    seq_id: Int64 | None = None
    session_id: Id | None = None
    model_seq_id: Seq | None = None
    base_model: Name | None = None
    user_metadata: dict[str, Any] | None = None
    weights_access_token: Name | None = None


class CreateSamplingSession(_Body):
    session_id: Id
    sampling_session_seq_id: Int64 = 0
    base_model: Name | None = None
    model_path: Name | None = None


class RetrieveFuture(_Body):
    request_id: Id
    allow_metadata_only: bool = False


class SetTtl(_Body):
    ttl_seconds: Int64 | None = None


class WeightsInfo(_Body):
    tinker_path: Name


class EncodedText(_Body):
    type: str = "encoded_text"
    tokens: Annotated[list[Int64], Field(max_length=MAX_PROMPT_TOKENS)] = Field(default_factory=list)


class ModelInput(_Body):
    chunks: Annotated[list[EncodedText], Field(max_length=MAX_PROMPT_TOKENS)] = Field(default_factory=list)


StopText = Annotated[str, StringConstraints(max_length=validate.MAX_STOP_CHARS)]


class SamplingParams(_Body):
    """Tinker's SamplingParams; the engine holds each value to its model's range."""

    max_tokens: Int64 | None = None
    temperature: float = 1.0
    top_k: Int64 = -1
    top_p: float = 1.0
    seed: Int64 | None = None
    stop: (StopText | Annotated[list[StopText], Field(max_length=validate.MAX_STOP_SEQUENCES)]
           | Annotated[list[Int64], Field(max_length=validate.MAX_STOP_SEQUENCES)] | None) = None


Indices = Annotated[list[Int64], Field(max_length=validate.MAX_JSON_TENSOR_VALUES)]


class TensorData(_Body):
    """Tinker's TensorData as JSON: values, a dtype name, a shape, and CSR indices if sparse."""

    data: Annotated[list[Int64 | float], Field(max_length=validate.MAX_JSON_TENSOR_VALUES)]
    dtype: Literal["int64", "float32"]
    shape: Annotated[list[Count], Field(max_length=validate.MAX_TENSOR_DIMS)] | None = None
    sparse_crow_indices: Indices | None = None
    sparse_col_indices: Indices | None = None


class Sample(_Body):
    """An `asample` body; the SDK's compute_logprobs is one of these too (one token, prompt
    logprobs). Fields the server does not offer are declared so that asking for them is refused
    by name rather than ignored."""

    sampling_session_id: Id | None = None
    prompt: ModelInput = Field(default_factory=ModelInput)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    num_samples: Count = 1
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Count = 0
    topk_sample_logprobs: Count = 0
    prompt_logprobs_last_n: Count | None = None
    record_stability_info: bool | None = None
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: Count = 0
