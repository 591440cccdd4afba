"""The SDK's data types, named and shaped as in the Tinker SDK.

Plain pydantic models over Python lists: numpy and torch are optional and imported only by the
helpers that convert to and from them. These types know nothing of the wire format (see _wire).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["int64", "float32"]
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]
StopReason = Literal["stop", "length"]

# Plain lists in Datum.loss_fn_inputs are typed by their key, as in Tinker.
_KEY_DTYPES: dict[str, DType] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class TensorData(StrictModel):
    """A dense tensor: flat `data` in row-major order, its `dtype` and `shape`."""

    data: list[int] | list[float]
    dtype: DType
    shape: Optional[list[int]] = None

    @model_validator(mode="after")
    def _check_shape(self) -> "TensorData":
        if self.shape is None:
            self.shape = [len(self.data)]
        if math.prod(self.shape) != len(self.data):
            raise ValueError(f"TensorData.shape {self.shape} does not hold {len(self.data)} values")
        return self

    @classmethod
    def from_numpy(cls, array: Any) -> "TensorData":
        dtype: DType = "int64" if array.dtype.kind in "iub" else "float32"
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> "TensorData":
        dtype: DType = "float32" if tensor.is_floating_point() else "int64"
        return cls(data=tensor.detach().cpu().reshape(-1).tolist(), dtype=dtype,
                   shape=list(tensor.shape))

    def to_numpy(self) -> Any:
        import numpy as np

        return np.asarray(self.data, dtype=self.dtype).reshape(self.shape)

    def to_torch(self) -> Any:
        import torch

        dtype = torch.int64 if self.dtype == "int64" else torch.float32
        return torch.tensor(self.data, dtype=dtype).reshape(self.shape)

    def tolist(self) -> list:
        if not self.shape or len(self.shape) == 1:
            return list(self.data)
        return self.to_numpy().tolist()


class EncodedTextChunk(StrictModel):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk = EncodedTextChunk


class ModelInput(StrictModel):
    """The tokens a model reads, as a list of chunks (text chunks only, for now)."""

    chunks: list[ModelInputChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> "ModelInput":
        return cls(chunks=[EncodedTextChunk(tokens=list(tokens))])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [t for chunk in self.chunks for t in chunk.tokens]

    def append_int(self, token: int) -> "ModelInput":
        return self.append(EncodedTextChunk(tokens=[token]))

    def append(self, chunk: ModelInputChunk) -> "ModelInput":
        return ModelInput(chunks=[*self.chunks, chunk])

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)


class Datum(StrictModel):
    """One training example: the input tokens and the loss function's per-token inputs."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData]

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
    max_tokens: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], list[int], None] = None
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
    metrics: Optional[dict[str, float]] = None


class SaveWeightsForSamplerResponse(StrictModel):
    path: str


class SampledSequence(StrictModel):
    stop_reason: StopReason
    tokens: list[int]
    logprobs: Optional[list[float]] = None


class SampleResponse(StrictModel):
    sequences: list[SampledSequence]
    type: Literal["sample"] = "sample"
    prompt_logprobs: Optional[list[Optional[float]]] = None
    topk_prompt_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None


class SupportedModel(StrictModel):
    model_name: str
    max_context_length: int
    vocab_size: int
    trainable: bool
    sampleable: bool
    source: str


class GetServerCapabilitiesResponse(StrictModel):
    supported_models: list[SupportedModel]
    loss_fns: list[str] = Field(default_factory=list)
    max_num_samples: int = 0
    server_version: str = ""


class LoraConfig(StrictModel):
    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


class GetInfoResponse(StrictModel):
    """What `TrainingClient.get_info()` returns."""

    training_run_id: str
    model_name: str
    is_lora: bool
    lora_rank: Optional[int] = None
    num_trainable_params: int
    max_context_length: int
    user_metadata: dict[str, str] = Field(default_factory=dict)
    created_at: Optional[datetime] = None

    @property
    def model_id(self) -> str:
        return self.training_run_id


# ---------------------------------------------------------------- training state and checkpoints


class SaveWeightsResponse(StrictModel):
    """What `TrainingClient.save_state` returns: the path of the full training state."""

    path: str


class LoadWeightsResponse(StrictModel):
    """What `TrainingClient.load_state` / `load_state_with_optimizer` return."""

    path: str


CheckpointType = Literal["training", "sampler"]


class Checkpoint(StrictModel):
    """A saved checkpoint: `training` (weights + optimizer, from save_state) or `sampler`."""

    checkpoint_id: str                  # its name, the last part of the path
    checkpoint_type: CheckpointType
    time: datetime
    path: str                           # stillroom://<run>/<weights|sampler_weights>/<name>
    size_bytes: Optional[int] = None
    public: bool = False
    expires_at: Optional[datetime] = None
    training_run_id: str
    base_model: str
    is_lora: bool

    @property
    def tinker_path(self) -> str:
        return self.path


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
    lora_rank: Optional[int] = None
    last_request_seq: int = 0
    num_trainable_params: int = 0
    created_at: Optional[datetime] = None
    last_checkpoint: Optional[Checkpoint] = None
    last_sampler_checkpoint: Optional[Checkpoint] = None
    user_metadata: dict[str, str] = Field(default_factory=dict)


class TrainingRunsResponse(StrictModel):
    training_runs: list[TrainingRun]
    cursor: Cursor


class CheckpointsListResponse(StrictModel):
    checkpoints: list[Checkpoint]
    cursor: Optional[Cursor] = None


class CheckpointArchiveUrlResponse(StrictModel):
    url: str
    expires: Optional[datetime] = None
    size_bytes: int = 0
