"""Stillroom's Python SDK: a thin client for a self-hosted post-training server.

Names, parameters and return shapes follow the Tinker SDK (0.38), so `import stillroom as tinker`
ports a loop; `stillroom.install_as_tinker()` goes further and lets code that says
`import tinker` (tinker-cookbook) run on Stillroom's SDK. The SDK needs grpcio, protobuf,
pydantic and httpx only; it never imports torch, transformers or sqlalchemy at import time.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, TypedDict

import httpx

from stillroom import types
from stillroom._alias import install_as_tinker
from stillroom.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BillingError,
    ConflictError,
    FailedPreconditionError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    StillroomError,
    TinkerError,
    UnprocessableEntityError,
)
from stillroom.futures import APIFuture
from stillroom.rest_client import RestClient
from stillroom.sampling_client import BackcompatSamplingClientFuture, SamplingClient
from stillroom.service_client import ServiceClient
from stillroom.training_client import BackcompatTrainingClientFuture, TrainingClient
from stillroom.types import (
    AdamOptimizerConfig,
    AdamParams,
    Checkpoint,
    CheckpointsListResponse,
    CheckpointType,
    Cursor,
    Datum,
    DimuonOptimizerConfig,
    DimuonParams,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetServerCapabilitiesResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelID,
    ModelInput,
    ModelInputChunk,
    OptimParams,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    StopReason,
    SupportedModel,
    TensorData,
    TensorDtype,
    TrainingRun,
    TrainingRunsResponse,
)

__version__ = "0.1.0"
__title__ = "stillroom"


Timeout = httpx.Timeout


class RequestOptions(TypedDict, total=False):
    """Tinker's per-request options; Stillroom's SDK takes none (names kept for annotations)."""

    timeout: float
    max_retries: int


PerDatumLossFn = Callable[[Datum, Any], tuple[Any, dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class LossHandle:
    """Tinker's handle for a loss made with `create_custom_loss`, which Stillroom does not offer
    (use forward_backward_custom); the name is here for annotations."""

    loss_id: str | None = None


class ExperimentalWarning(Warning):
    """Tinker's warning for experimental features (Stillroom raises none)."""


class AdminClient(RestClient):
    """Tinker's admin client (audit log, billing); a self-hosted server offers the RestClient's
    calls only."""


__all__ = [
    "APIConnectionError", "APIError", "APIFuture", "APIResponseValidationError", "APIStatusError",
    "APITimeoutError", "AdamOptimizerConfig", "AdamParams", "AdminClient", "AuthenticationError",
    "BackcompatSamplingClientFuture", "BackcompatTrainingClientFuture", "BadRequestError",
    "BillingError", "Checkpoint", "CheckpointType", "CheckpointsListResponse", "ConflictError",
    "Cursor", "Datum", "DimuonOptimizerConfig", "DimuonParams", "DmelChunk", "EncodedTextChunk",
    "ExperimentalWarning", "FailedPreconditionError", "ForwardBackwardOutput", "GetInfoResponse",
    "GetServerCapabilitiesResponse", "InternalServerError", "LoadWeightsResponse", "LoraConfig",
    "ModelID", "ModelInput", "ModelInputChunk", "NotFoundError", "OptimParams", "OptimStepRequest",
    "OptimStepResponse", "ParsedCheckpointTinkerPath", "PermissionDeniedError",
    "PromptProvenanceSpan", "RateLimitError", "RequestFailedError", "RestClient", "SampleRequest",
    "SampleResponse", "SampledProvenanceSpan", "SampledSequence", "SamplingClient",
    "SamplingParams", "SaveWeightsForSamplerResponse", "SaveWeightsResponse", "ServiceClient",
    "StillroomError", "StopReason", "SupportedModel", "TensorData", "TensorDtype", "TinkerError",
    "TrainingClient", "TrainingRun", "TrainingRunsResponse", "UnprocessableEntityError",
    "install_as_tinker", "types", "__title__", "__version__", "Timeout", "RequestOptions",
    "PerDatumLossFn", "LossHandle",
]
