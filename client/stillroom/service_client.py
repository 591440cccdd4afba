"""ServiceClient: the entry point of the SDK, which makes training, sampling and REST clients.

It owns the one background connection that every client it makes shares. The server address and
key come from the arguments or from STILLROOM_BASE_URL / STILLROOM_API_KEY.
"""

from __future__ import annotations

import os
from typing import Any

from stillroom import _wire, types
from stillroom._connection import DEFAULT_BASE_URL, Connection, connection_settings
from stillroom._proto import stillroom_pb2 as pb
from stillroom.futures import APIFuture, ValueFuture
from stillroom.rest_client import RestClient
from stillroom.sampling_client import SamplingClient, SamplingClientFuture
from stillroom.training_client import TrainingClient, TrainingClientFuture

__all__ = ["DEFAULT_BASE_URL", "ServiceClient"]


async def server_capabilities(connection: Connection) -> types.GetServerCapabilitiesResponse:
    caps = await connection.call("GetServerCapabilities", pb.GetServerCapabilitiesRequest())
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


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is not None and getattr(optimizer, "type", None) != "adamw":
        raise ValueError(f"optimizer: Stillroom trains with AdamW only, got {optimizer!r}")


def _lora(rank: int, train_mlp: bool, train_attn: bool, train_unembed: bool,
          optimizer: Any) -> pb.LoraConfig:
    _check_optimizer(optimizer)
    return pb.LoraConfig(rank=rank, train_mlp=train_mlp, train_attn=train_attn,
                         train_unembed=train_unembed)


class ServiceClient:
    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None,
                 *, display_name: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, default_headers_overrides: dict | None = None,
                 tls_root_cert: str | None = None, **kwargs: Any) -> None:
        """`base_url` "host:port" (plain) or "grpcs://host:port" (TLS); `tls_root_cert`, a PEM file
        of the certificate to trust (also STILLROOM_TLS_ROOT_CERT), turns TLS on as well.
        `user_metadata` is given to every training run this client makes; Tinker's `project_id`,
        `display_name` and `default_headers_overrides` are accepted and unused."""
        self._user_metadata = dict(user_metadata or {})
        tls_root_cert = tls_root_cert or os.environ.get("STILLROOM_TLS_ROOT_CERT")
        self._connection = Connection(*connection_settings(base_url, api_key), tls_root_cert=tls_root_cert)

    def close(self, status: str = "success", detail: str | None = None) -> APIFuture[None]:
        """Close the connection (Tinker's `close(status, detail)`: the status is not recorded);
        returns a finished future. Closing twice is harmless."""
        if status not in ("success", "errored", "interrupted"):
            raise ValueError(f"close: status must be success, errored or interrupted, got {status!r}")
        self._connection.close()
        return ValueFuture(None)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def get_telemetry(self) -> None:
        """Tinker's client telemetry; Stillroom sends none."""
        return None

    # ---------------------------------------------------------------- capabilities

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return self._connection.run(self._get_server_capabilities())

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await self._connection.run_async(self._get_server_capabilities())

    async def _get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return await server_capabilities(self._connection)

    # ---------------------------------------------------------------- training clients

    def _ready_training_client(self, coro) -> TrainingClientFuture:
        future = TrainingClientFuture(self._connection.spawn(coro))
        future.result()  # errors surface here, at the call
        return future

    def create_lora_training_client(self, base_model: str, rank: int = 32,
                                    seed: int | None = None, train_mlp: bool = True,
                                    train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None,
                                    optimizer: Any = None) -> TrainingClientFuture:
        """A LoRA training run over `base_model`. The answer is the client, usable at once, and
        a future of it (`.result()`, `await`), as Tinker's."""
        lora = _lora(rank, train_mlp, train_attn, train_unembed, optimizer)
        return self._ready_training_client(
            self._create_training_client(base_model, lora, seed, user_metadata))

    async def create_lora_training_client_async(
            self, base_model: str, rank: int = 32, seed: int | None = None,
            train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
            user_metadata: dict[str, str] | None = None, optimizer: Any = None) -> TrainingClient:
        lora = _lora(rank, train_mlp, train_attn, train_unembed, optimizer)
        return await self._connection.run_async(
            self._create_training_client(base_model, lora, seed, user_metadata))

    def create_full_training_client(self, base_model: str, seed: int | None = None,
                                    user_metadata: dict[str, str] | None = None) -> TrainingClientFuture:
        """A training client that updates every weight of its own copy of `base_model`.

        Stillroom's addition to the Tinker surface: it is how the randomly initialised presets
        are trained from scratch.
        """
        return self._ready_training_client(
            self._create_training_client(base_model, None, seed, user_metadata))

    async def create_full_training_client_async(
            self, base_model: str, seed: int | None = None,
            user_metadata: dict[str, str] | None = None) -> TrainingClient:
        return await self._connection.run_async(
            self._create_training_client(base_model, None, seed, user_metadata))

    def _metadata(self, user_metadata: dict[str, str] | None) -> dict[str, str]:
        return {**self._user_metadata, **(user_metadata or {})}

    async def _create_training_client(self, base_model: str, lora: pb.LoraConfig | None,
                                      seed: int | None,
                                      user_metadata: dict[str, str] | None) -> TrainingClient:
        request = pb.CreateTrainingRunRequest(base_model=base_model,
                                              user_metadata=self._metadata(user_metadata))
        if lora is not None:
            request.lora.CopyFrom(lora)
        if seed is not None:
            request.seed = seed
        info = await self._connection.call("CreateTrainingRun", request, timeout=600, retry=False)
        return TrainingClient(self, info)

    def create_training_client_from_state(
            self, path: str, base_model: str | None = None,
            user_metadata: dict[str, str] | None = None, weights_access_token: str | None = None,
            optimizer: Any = None) -> TrainingClientFuture:
        """A new training run with the weights of a saved state (stillroom:// or tinker://
        <run>/weights/<name>) and fresh optimizer moments. The state names its base model, so
        Tinker's `base_model` and `weights_access_token` are accepted and unused."""
        _check_optimizer(optimizer)
        return self._ready_training_client(self._create_from_state(path, False, user_metadata, base_model))

    async def create_training_client_from_state_async(
            self, path: str, base_model: str | None = None,
            user_metadata: dict[str, str] | None = None, weights_access_token: str | None = None,
            optimizer: Any = None) -> TrainingClient:
        _check_optimizer(optimizer)
        return await self._connection.run_async(
            self._create_from_state(path, False, user_metadata, base_model))

    def create_training_client_from_state_with_optimizer(
            self, path: str, base_model: str | None = None,
            user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClientFuture:
        """A new training run that continues a saved state exactly: weights and optimizer state."""
        return self._ready_training_client(self._create_from_state(path, True, user_metadata, base_model))

    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, base_model: str | None = None,
            user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClient:
        return await self._connection.run_async(
            self._create_from_state(path, True, user_metadata, base_model))

    async def _create_from_state(self, path: str, with_optimizer: bool,
                                 user_metadata: dict[str, str] | None,
                                 base_model: str | None = None) -> TrainingClient:
        request = pb.CreateTrainingRunFromStateRequest(path=_wire.checkpoint_path(path),
                                                       with_optimizer=with_optimizer,
                                                       user_metadata=self._metadata(user_metadata))
        info = await self._connection.call("CreateTrainingRunFromState", request, timeout=600,
                                           retry=False)
        return TrainingClient(self, info)

    # ---------------------------------------------------------------- REST client

    def create_rest_client(self) -> RestClient:
        """A client for listing, expiring, deleting and downloading runs and checkpoints."""
        return RestClient(self)

    # ---------------------------------------------------------------- sampling clients

    def create_sampling_client(self, model_path: str | None = None,
                               base_model: str | None = None, retry_config: Any = None,
                               record_stability_info: bool = False) -> SamplingClientFuture:
        """A sampling client on saved sampler weights or a base model: usable at once, and a
        future of it (`.result()`, `await`), as Tinker's. Samples always carry sequence ids, so
        `record_stability_info` changes nothing; `retry_config` is Tinker's and unused."""
        future = SamplingClientFuture(self._connection.spawn(
            self._create_sampling_client(model_path, base_model, record_stability_info)))
        future.result()  # errors surface here, at the call
        return future

    async def create_sampling_client_async(self, model_path: str | None = None,
                                           base_model: str | None = None, retry_config: Any = None,
                                           record_stability_info: bool = False) -> SamplingClient:
        return await self._connection.run_async(
            self._create_sampling_client(model_path, base_model, record_stability_info))

    async def _create_sampling_client(self, model_path: str | None, base_model: str | None,
                                      record_stability_info: bool = False) -> SamplingClient:
        if (model_path is None) == (base_model is None):
            raise ValueError("create_sampling_client needs exactly one of model_path or base_model")
        request = (pb.CreateSamplingSessionRequest(model_path=_wire.checkpoint_path(model_path))
                   if model_path else pb.CreateSamplingSessionRequest(base_model=base_model))
        info = await self._connection.call("CreateSamplingSession", request, timeout=600)
        return SamplingClient(self, info, record_stability_info=record_stability_info)

    # ---------------------------------------------------------------- shared helpers

    def _load_tokenizer(self, base_model: str) -> Any:
        from stillroom._tokenizers import load_tokenizer

        return load_tokenizer(self._connection, base_model)
