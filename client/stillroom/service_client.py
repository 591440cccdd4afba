"""ServiceClient: the entry point of the SDK, which makes training, sampling and REST clients.

It owns the one background connection that every client it makes shares. The server address and
key come from the arguments or from STILLROOM_BASE_URL / STILLROOM_API_KEY.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from stillroom import types
from stillroom._connection import Connection
from stillroom._proto import stillroom_pb2 as pb
from stillroom.rest_client import RestClient
from stillroom.sampling_client import SamplingClient
from stillroom.training_client import TrainingClient

DEFAULT_BASE_URL = "localhost:50051"


class ServiceClient:
    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 tls_root_cert: Optional[str] = None, **_unused: Any) -> None:
        """`base_url` "host:port" (plain) or "grpcs://host:port" (TLS); `tls_root_cert`, a PEM file
        of the certificate to trust (also STILLROOM_TLS_ROOT_CERT), turns TLS on as well."""
        base_url = base_url or os.environ.get("STILLROOM_BASE_URL") or DEFAULT_BASE_URL
        api_key = api_key or os.environ.get("STILLROOM_API_KEY")
        tls_root_cert = tls_root_cert or os.environ.get("STILLROOM_TLS_ROOT_CERT")
        self._connection = Connection(base_url, api_key, tls_root_cert=tls_root_cert)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- capabilities

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return self._connection.run(self._get_server_capabilities())

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await self._connection.run_async(self._get_server_capabilities())

    async def _get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        caps = await self._connection.call("GetServerCapabilities", pb.GetServerCapabilitiesRequest())
        return types.GetServerCapabilitiesResponse(
            supported_models=[
                types.SupportedModel(model_name=m.model_name, max_context_length=m.max_context_length,
                                     vocab_size=m.vocab_size, trainable=m.trainable,
                                     sampleable=m.sampleable, source=m.source)
                for m in caps.supported_models
            ],
            loss_fns=list(caps.loss_fns), max_num_samples=caps.max_num_samples,
            server_version=caps.server_version,
        )

    # ---------------------------------------------------------------- training clients

    def create_lora_training_client(self, base_model: str, rank: int = 32,
                                    seed: Optional[int] = None, train_mlp: bool = True,
                                    train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        lora = pb.LoraConfig(rank=rank, train_mlp=train_mlp, train_attn=train_attn,
                             train_unembed=train_unembed)
        return self._connection.run(self._create_training_client(base_model, lora, seed, user_metadata))

    async def create_lora_training_client_async(
            self, base_model: str, rank: int = 32, seed: Optional[int] = None,
            train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
            user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        lora = pb.LoraConfig(rank=rank, train_mlp=train_mlp, train_attn=train_attn,
                             train_unembed=train_unembed)
        return await self._connection.run_async(
            self._create_training_client(base_model, lora, seed, user_metadata))

    def create_full_training_client(self, base_model: str, seed: Optional[int] = None,
                                    user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        """A training client that updates every weight of its own copy of `base_model`.

        Stillroom's addition to the Tinker surface: it is how the randomly initialised presets
        are trained from scratch.
        """
        return self._connection.run(self._create_training_client(base_model, None, seed, user_metadata))

    async def create_full_training_client_async(
            self, base_model: str, seed: Optional[int] = None,
            user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        return await self._connection.run_async(
            self._create_training_client(base_model, None, seed, user_metadata))

    async def _create_training_client(self, base_model: str, lora: Optional[pb.LoraConfig],
                                      seed: Optional[int],
                                      user_metadata: Optional[dict[str, str]]) -> TrainingClient:
        request = pb.CreateTrainingRunRequest(base_model=base_model,
                                              user_metadata=user_metadata or {})
        if lora is not None:
            request.lora.CopyFrom(lora)
        if seed is not None:
            request.seed = seed
        info = await self._connection.call("CreateTrainingRun", request, timeout=600, retry=False)
        return TrainingClient(self, info)

    def create_training_client_from_state(self, path: str,
                                          user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        """A new training run with the weights of a saved state (stillroom://<run>/weights/<name>)
        and fresh optimizer moments."""
        return self._connection.run(self._create_from_state(path, False, user_metadata))

    async def create_training_client_from_state_async(
            self, path: str, user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        return await self._connection.run_async(self._create_from_state(path, False, user_metadata))

    def create_training_client_from_state_with_optimizer(
            self, path: str, user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        """A new training run that continues a saved state exactly: weights and optimizer state."""
        return self._connection.run(self._create_from_state(path, True, user_metadata))

    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, user_metadata: Optional[dict[str, str]] = None) -> TrainingClient:
        return await self._connection.run_async(self._create_from_state(path, True, user_metadata))

    async def _create_from_state(self, path: str, with_optimizer: bool,
                                 user_metadata: Optional[dict[str, str]]) -> TrainingClient:
        request = pb.CreateTrainingRunFromStateRequest(path=path, with_optimizer=with_optimizer,
                                                       user_metadata=user_metadata or {})
        info = await self._connection.call("CreateTrainingRunFromState", request, timeout=600,
                                           retry=False)
        return TrainingClient(self, info)

    # ---------------------------------------------------------------- REST client

    def create_rest_client(self) -> RestClient:
        """A client for listing, expiring, deleting and downloading runs and checkpoints."""
        return RestClient(self)

    # ---------------------------------------------------------------- sampling clients

    def create_sampling_client(self, model_path: Optional[str] = None,
                               base_model: Optional[str] = None) -> SamplingClient:
        return self._connection.run(self._create_sampling_client(model_path, base_model))

    async def create_sampling_client_async(self, model_path: Optional[str] = None,
                                           base_model: Optional[str] = None) -> SamplingClient:
        return await self._connection.run_async(self._create_sampling_client(model_path, base_model))

    async def _create_sampling_client(self, model_path: Optional[str],
                                      base_model: Optional[str]) -> SamplingClient:
        if (model_path is None) == (base_model is None):
            raise ValueError("create_sampling_client needs exactly one of model_path or base_model")
        request = (pb.CreateSamplingSessionRequest(model_path=model_path) if model_path
                   else pb.CreateSamplingSessionRequest(base_model=base_model))
        info = await self._connection.call("CreateSamplingSession", request, timeout=600)
        return SamplingClient(self, info)

    # ---------------------------------------------------------------- shared helpers

    def _load_tokenizer(self, base_model: str) -> Any:
        from stillroom._tokenizers import load_tokenizer

        return load_tokenizer(self._connection, base_model)
