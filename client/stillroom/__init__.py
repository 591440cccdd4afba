"""Stillroom's Python SDK: a thin client for a self-hosted post-training server.

Names and semantics follow the Tinker SDK, so `import stillroom as tinker` ports a loop. The SDK
needs grpcio, protobuf, pydantic and httpx only; it never imports torch, transformers or sqlalchemy
at import time.
"""

from stillroom.errors import (APIConnectionError, APIError, APITimeoutError, AuthenticationError,
                              BadRequestError, ConflictError, FailedPreconditionError,
                              InternalServerError, NotFoundError, PermissionDeniedError,
                              RateLimitError, StillroomError)
from stillroom.futures import APIFuture
from stillroom.rest_client import RestClient
from stillroom.sampling_client import SamplingClient
from stillroom.service_client import ServiceClient
from stillroom.training_client import TrainingClient
from stillroom.types import (AdamParams, Datum, EncodedTextChunk, ForwardBackwardOutput,
                             GetInfoResponse, GetServerCapabilitiesResponse, ModelInput,
                             OptimStepResponse, SampledSequence, SampleResponse, SamplingParams,
                             SaveWeightsForSamplerResponse, SupportedModel, TensorData)
from stillroom.types import (Checkpoint, CheckpointsListResponse, Cursor, LoadWeightsResponse,
                             SaveWeightsResponse, TrainingRun, TrainingRunsResponse)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError", "APIError", "APIFuture", "APITimeoutError", "AdamParams",
    "AuthenticationError", "BadRequestError", "ConflictError", "Datum", "EncodedTextChunk",
    "FailedPreconditionError", "ForwardBackwardOutput", "GetInfoResponse",
    "GetServerCapabilitiesResponse", "InternalServerError", "ModelInput", "NotFoundError",
    "OptimStepResponse", "PermissionDeniedError", "RateLimitError", "SampleResponse",
    "SampledSequence", "SamplingClient", "SamplingParams", "SaveWeightsForSamplerResponse",
    "ServiceClient", "StillroomError", "SupportedModel", "TensorData", "TrainingClient",
    "Checkpoint", "CheckpointsListResponse", "Cursor", "LoadWeightsResponse", "RestClient",
    "SaveWeightsResponse", "TrainingRun", "TrainingRunsResponse",
]
