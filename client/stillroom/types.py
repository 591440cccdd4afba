"""The SDK's data types, named and shaped as in the Tinker SDK.

Plain pydantic models over Python lists: numpy and torch are optional and imported only by the
helpers that convert to and from them. These types know nothing of the wire format (see _wire).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

# Tinker's names that Stillroom accepts, re-exported here (see _compat_types).
from stillroom._compat_types import (  # noqa: F401
    AdamOptimizerConfig,
    AuditLogEntry,
    AuditLogResponse,
    DimuonOptimizerConfig,
    DimuonParams,
    DmelChunk,
    ExternalWeightsUrlsResponse,
    ImageAssetPointerChunk,
    ImageChunk,
    ModelData,
    ModelID,
    OptimizerConfig,
    PromptProvenanceSpan,
    ProvenanceSpans,
    RequestErrorCategory,
    RequestID,
    SampledProvenanceSpan,
    SamplingClientKind,
    TensorDtype,
    WeightsInfoResponse,
    WhoamiResponse,
    check_tiling,
)

DType = TensorDtype
# Tinker's losses, plus Stillroom's server-side teacher_reverse_kl; "custom" names
# forward_backward_custom's requests in Tinker and is not a server loss.
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo",
                     "stable_reinforce", "custom", "teacher_reverse_kl"]
StopReason = Literal["length", "stop"]

# Plain lists in Datum.loss_fn_inputs are typed by their key, as in Tinker.
_KEY_DTYPES: dict[str, DType] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TensorData(StrictModel):
    """A tensor: flat `data` in row-major order, its `dtype` and `shape`. With
    `sparse_crow_indices` / `sparse_col_indices` it is sparse CSR (as in Tinker): `data` holds the
    listed values only, every other entry is the pad value (0 unless told)."""

    data: list[int] | list[float]
    dtype: DType
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="after")
    def _check_shape(self) -> TensorData:
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise ValueError("TensorData: set sparse_crow_indices and sparse_col_indices together")
        if self.sparse_crow_indices is not None and self.sparse_col_indices is not None:
            if self.shape is None or len(self.shape) != 2:
                raise ValueError("TensorData: a sparse CSR tensor needs a 2-D shape")
            if (len(self.sparse_crow_indices) != self.shape[0] + 1
                    or len(self.sparse_col_indices) != len(self.data)):
                raise ValueError("TensorData: sparse CSR indices do not match shape and data")
            return self
        if self.shape is None:
            self.shape = [len(self.data)]
        if math.prod(self.shape) != len(self.data):
            raise ValueError(f"TensorData.shape {self.shape} does not hold {len(self.data)} values")
        return self

    def dense(self, pad_value: int = 0) -> TensorData:
        """This tensor with its sparse entries filled in (itself when it is dense)."""
        crow, col, shape = self.sparse_crow_indices, self.sparse_col_indices, self.shape
        if crow is None or col is None or shape is None:
            return self
        rows, cols = shape
        values: list = [pad_value] * (rows * cols)
        for row in range(rows):
            for index in range(crow[row], crow[row + 1]):
                values[row * cols + col[index]] = self.data[index]
        cast = int if self.dtype == "int64" else float
        return TensorData(data=[cast(v) for v in values], dtype=self.dtype, shape=list(shape))

    @classmethod
    def from_torch_sparse(cls, tensor: Any, pad_value: int = 0) -> TensorData:
        """A CSR TensorData of a 2-D tensor, leaving out entries equal to `pad_value` (a dense
        one when that would not be smaller)."""
        if tensor.dim() != 2:
            return cls.from_torch(tensor)
        listed = tensor != pad_value
        nnz = int(listed.sum())
        if tensor.shape[0] + 1 + 2 * nnz >= tensor.numel():
            return cls.from_torch(tensor)
        crow = [0]
        cols: list[int] = []
        values: list = []
        for row in tensor.detach().cpu():
            index = (row != pad_value).nonzero().flatten().tolist()
            cols.extend(index)
            values.extend(row[index].tolist())
            crow.append(len(cols))
        dtype: DType = "float32" if tensor.is_floating_point() else "int64"
        return cls(data=values, dtype=dtype, shape=list(tensor.shape), sparse_crow_indices=crow,
                   sparse_col_indices=cols)

    @classmethod
    def from_numpy(cls, array: Any) -> TensorData:
        dtype: DType = "int64" if array.dtype.kind in "iub" else "float32"
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        dtype: DType = "float32" if tensor.is_floating_point() else "int64"
        return cls(data=tensor.detach().cpu().reshape(-1).tolist(), dtype=dtype,
                   shape=list(tensor.shape))

    def to_numpy(self, pad_value: int = 0) -> Any:
        import numpy as np

        dense = self.dense(pad_value)
        return np.asarray(dense.data, dtype=dense.dtype).reshape(dense.shape or [len(dense.data)])

    def to_torch(self, pad_value: int = 0) -> Any:
        import torch

        dense = self.dense(pad_value)
        dtype = torch.int64 if dense.dtype == "int64" else torch.float32
        return torch.tensor(dense.data, dtype=dtype).reshape(dense.shape or [len(dense.data)])

    def tolist(self, pad_value: int = 0) -> list:
        dense = self.dense(pad_value)
        if not dense.shape or len(dense.shape) == 1:
            return list(dense.data)
        return dense.to_numpy().tolist()


class EncodedTextChunk(StrictModel):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk = Annotated[EncodedTextChunk | ImageAssetPointerChunk | ImageChunk | DmelChunk,
                            Field(discriminator="type")]


class ModelInput(StrictModel):
    """The tokens a model reads, as a list of chunks. Tinker's image and audio chunks are accepted
    by the type, but Stillroom's models read text tokens only: sending one is refused."""

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        tokens: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError("to_ints only supported for ModelInput with EncodedTextChunks, got "
                                 f"{[type(chunk).__name__ for chunk in self.chunks]}")
            tokens.extend(chunk.tokens)
        return tokens

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)


class Datum(StrictModel):
    """One training example: the input tokens and the loss function's per-token inputs.

    Provenance spans (`with_provenance`) are checked here as Tinker checks them; Stillroom's wire
    does not carry them (its losses do not need them)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    loss_fn_input_spans: ProvenanceSpans | None = None

    if TYPE_CHECKING:  # the constructor also takes plain lists, numpy arrays and torch tensors
        def __init__(self, *, model_input: ModelInput, loss_fn_inputs: Mapping[str, Any] = ...,
                     model_input_spans: ProvenanceSpans | None = None,
                     loss_fn_input_spans: ProvenanceSpans | None = None) -> None: ...

    @model_validator(mode="after")
    def _check_spans(self) -> Datum:
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("provenance comes as a pair: set both span lists or neither")
        return self

    def with_provenance(self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans) -> Datum:
        """A copy carrying provenance: `model_input` spans tile the input tokens,
        `loss_fn_inputs` spans tile `loss_fn_inputs["target_tokens"]`."""
        check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.shape is not None and len(targets.shape) == 1:
            check_tiling("loss_fn_inputs", loss_fn_inputs, targets.shape[0])
        return self.model_copy(update={"model_input_spans": list(model_input),
                                       "loss_fn_input_spans": list(loss_fn_inputs)})

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_plain_values(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {key: _as_tensor_data(key, item) for key, item in value.items()}


def _as_tensor_data(key: str, value: Any) -> Any:
    if isinstance(value, (TensorData, dict)):
        return value
    if hasattr(value, "detach"):  # torch.Tensor
        if key in ("target_tokens", "weights") and value.dim() == 2:
            return TensorData.from_torch_sparse(value)
        return TensorData.from_torch(value)
    if hasattr(value, "dtype") and hasattr(value, "reshape"):  # numpy array
        return TensorData.from_numpy(value)
    if isinstance(value, (list, tuple)):
        dtype = _KEY_DTYPES.get(key)
        if dtype is None:
            dtype = "float32" if any(isinstance(v, float) for v in value) else "int64"
        data = [int(v) for v in value] if dtype == "int64" else [float(v) for v in value]
        return TensorData(data=data, dtype=dtype, shape=[len(data)])
    return value


class SamplingParams(StrictModel):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class AdamParams(StrictModel):
    """AdamW settings for one `optim_step`; weight decay is decoupled."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class ForwardBackwardOutput(StrictModel):
    loss_fn_output_type: str = "TensorData"
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class OptimStepResponse(StrictModel):
    metrics: dict[str, float] | None = None


class SaveWeightsForSamplerResponse(StrictModel):
    path: str
    type: Literal["save_weights_for_sampler"] | None = None


TopkLogprobsList = list[list[tuple[int, float]] | None]


class SampledSequence(StrictModel):
    """One sampled sequence. `sequence_id` names it (unique per server); `topk_logprobs` is set
    when the request asked for `topk_sample_logprobs`."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str = ""
    topk_logprobs: TopkLogprobsList | None = None

    @property
    def tokens_np(self) -> Any:
        import numpy as np

        return np.asarray(self.tokens, dtype=np.int32)

    @property
    def logprobs_np(self) -> Any:
        import numpy as np

        return None if self.logprobs is None else np.asarray(self.logprobs, dtype=np.float32)


class SampleResponse(StrictModel):
    sequences: list[SampledSequence]
    type: Literal["sample"] = "sample"
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: TopkLogprobsList | None = None
    target_prompt_logprobs: TensorData | None = None
    prompt_cache_hit_tokens: int = 0
    prompt_alt_tokens: Any | None = None


class SupportedModel(StrictModel):
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None
    vocab_size: int | None = None
    source: str = ""


class GetServerCapabilitiesResponse(StrictModel):
    supported_models: list[SupportedModel]
    loss_fns: list[str] = Field(default_factory=list)
    max_num_samples: int = 0
    server_version: str = ""


class LoraConfig(StrictModel):
    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class GetInfoResponse(StrictModel):
    """What `TrainingClient.get_info()` returns: Tinker's fields, then Stillroom's."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    type: Literal["get_info"] | None = None
    model_data: ModelData
    model_id: ModelID
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    training_run_id: str = ""
    num_trainable_params: int = 0
    max_context_length: int = 0
    user_metadata: dict[str, str] = Field(default_factory=dict)
    created_at: datetime | None = None


# ---------------------------------------------------------------- training state and checkpoints


class SaveWeightsResponse(StrictModel):
    """What `TrainingClient.save_state` returns: the path of the full training state."""

    path: str
    type: Literal["save_weights"] | None = None


class LoadWeightsResponse(StrictModel):
    """What `TrainingClient.load_state` / `load_state_with_optimizer` return."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


CheckpointType = Literal["training", "sampler", "external"]
_SEGMENT_TYPES: dict[str, CheckpointType] = {
    "weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


class Checkpoint(StrictModel):
    """A saved checkpoint: `training` (weights + optimizer, from save_state) or `sampler`.

    `checkpoint_id` is Tinker's: the path after the run, e.g. "weights/step-10"."""

    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str                    # stillroom://<run>/<weights|sampler_weights>/<name>
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None
    training_run_id: str = ""
    base_model: str = ""
    is_lora: bool = False

    @property
    def path(self) -> str:
        return self.tinker_path

    @property
    def name(self) -> str:
        return self.checkpoint_id.rsplit("/", 1)[-1]


class ParsedCheckpointTinkerPath(StrictModel):
    """A checkpoint path taken apart; `tinker://` and `stillroom://` name the same checkpoints."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        scheme = next((s for s in ("tinker://", "stillroom://") if tinker_path.startswith(s)), None)
        parts = tinker_path[len(scheme):].split("/") if scheme else []
        if len(parts) != 3 or parts[1] not in _SEGMENT_TYPES or not parts[0] or not parts[2]:
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        return cls(tinker_path=tinker_path, training_run_id=parts[0],
                   checkpoint_type=_SEGMENT_TYPES[parts[1]], checkpoint_id="/".join(parts[1:]))


class Cursor(StrictModel):
    offset: int
    limit: int
    total_count: int


class TrainingRun(StrictModel):
    training_run_id: str
    base_model: str
    model_owner: str = ""
    is_lora: bool
    corrupted: bool = False
    lora_rank: int | None = None
    last_request_time: datetime | None = None
    last_request_seq: int = 0
    num_trainable_params: int = 0
    created_at: datetime | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)


class TrainingRunsResponse(StrictModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class CheckpointsListResponse(StrictModel):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class CheckpointArchiveUrlResponse(StrictModel):
    url: str
    expires: datetime | None = None
    size_bytes: int = 0


class ClientSession(StrictModel):
    """A Tinker client session on the server (Stillroom's own; Tinker's RestClient shows ids only)."""
    session_id: str
    state: Literal["live", "finished", "lapsed"]
    end_reason: str | None = None       # the finish reason, "lapsed", or "ended by its owner"
    created_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    ended_at: datetime | None = None
    training_run_ids: list[str] = Field(default_factory=list)
    live_runs: int = 0                  # runs still in memory, counting against the owner's limits
    sampler_ids: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, str] = Field(default_factory=dict)


class ClientSessionsResponse(StrictModel):
    sessions: list[ClientSession]
    session_timeout_seconds: float = 0.0  # no heartbeat for this long ends a session; 0: never


# ---------------------------------------------------------------- request shapes, as Tinker names them

OptimParams = AdamParams | DimuonParams


class OptimStepRequest(StrictModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    optim_params: OptimParams = Field(
        validation_alias=AliasChoices("optim_params", "adam_params", "optimizer_params"))
    model_id: ModelID
    seq_id: int | None = None
    type: Literal["optim_step"] = "optim_step"


class SampleRequest(StrictModel):
    """A sample call's arguments as one object (what the SDK sends, in Tinker's field names)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"


LossFnInputs = dict[str, TensorData]
LossFnOutput = dict[str, TensorData]
