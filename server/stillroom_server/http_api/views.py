"""Core records -> Tinker's JSON shapes (runs, checkpoints, infos, future results), and the few
request fields that need translating (model ids, LoRA and Adam settings, checkpoint ids in URLs).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core import validate
from stillroom_server.core.errors import InvalidInput
from stillroom_server.core.service import RunInfo, SamplerInfo
from stillroom_server.engine import checkpoints
from stillroom_server.engine.types import AdamConfig, LoraSpec
from stillroom_server.http_api import schemas, wire

PROTO = "application/x-protobuf"
CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def model_id(session_id: str, model_seq_id: int) -> str:
    """The id the SDK itself derives for a training client (create_training_client_from_state
    computes it without asking), so the server must name runs the same way."""
    if model_seq_id < 0:
        raise InvalidInput(f"model_seq_id: must be >= 0, got {model_seq_id}")
    return f"{session_id}:train:{model_seq_id}"


def lora_spec(config: schemas.LoraConfig | None) -> LoraSpec | None:
    """Tinker trains LoRA only; a body without lora_config gets the SDK's defaults."""
    config = config or schemas.LoraConfig()
    return LoraSpec(config.rank, config.train_mlp, config.train_attn, config.train_unembed)


def check_optimizer(config: schemas.OptimizerConfig | None) -> None:
    if config is not None and config.type not in ("adam", "adamw"):
        raise InvalidInput(f"optimizer_config.type: this server offers AdamW, got {config.type!r}")


def adam(params: schemas.AdamParams) -> AdamConfig:
    return AdamConfig(params.learning_rate, params.beta1, params.beta2, params.eps,
                      params.weight_decay, params.grad_clip_norm)


def window(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit") or validate.DEFAULT_LIST_LIMIT)
        offset = int(request.query_params.get("offset") or 0)
    except ValueError:
        raise InvalidInput("limit/offset: must be integers") from None
    return validate.list_window(limit, offset)


def checkpoint_path(request: Request) -> str:
    params = request.path_params
    if params["kind"] not in checkpoints.KINDS:
        raise InvalidInput(f"checkpoint_id: must be weights/, sampler_weights/ or external_weights/<name>, "
                           f"got {params['kind']}/{params['name']}")
    return f"{checkpoints.SCHEME}{params['run_id']}/{params['kind']}/{params['name']}"


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def tinker_path(uri: str) -> str:
    return checkpoints.parse(uri).tinker_uri


def checkpoint(row) -> dict[str, Any]:
    return {"checkpoint_id": f"{row.kind}/{row.name}", "checkpoint_type": CHECKPOINT_TYPES[row.kind],
            "time": iso(row.created_at), "tinker_path": tinker_path(row.path),
            "size_bytes": row.size_bytes, "public": bool(row.published),
            "user_metadata": json.loads(row.user_metadata_json or "{}") or None,
            "expires_at": iso(row.expires_at)}


def training_run(info: RunInfo, owner: str) -> dict[str, Any]:
    return {"training_run_id": info.training_run_id, "base_model": info.base_model,
            "model_owner": owner, "is_lora": info.is_lora, "corrupted": False,
            "lora_rank": info.lora_rank if info.is_lora else None,
            "last_request_time": iso(info.last_request_time),
            "last_checkpoint": checkpoint(info.last_checkpoint) if info.last_checkpoint else None,
            "last_sampler_checkpoint": (checkpoint(info.last_sampler_checkpoint)
                                        if info.last_sampler_checkpoint else None),
            "user_metadata": info.user_metadata or None}


def get_info(info: RunInfo, tokenizer_dir: str) -> dict[str, Any]:
    return {"type": "get_info", "model_id": info.training_run_id,
            "model_data": {"arch": "causal_lm", "model_name": info.base_model,
                           "tokenizer_id": tokenizer_dir},
            "is_lora": info.is_lora, "lora_rank": info.lora_rank if info.is_lora else None,
            "model_name": info.base_model}


def weights_info(info: RunInfo) -> dict[str, Any]:
    lora = (info.config or {}).get("lora") or {}
    return {"base_model": info.base_model, "is_lora": info.is_lora,
            "lora_rank": info.lora_rank if info.is_lora else None,
            "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn")}


def sampler(info: SamplerInfo) -> dict[str, Any]:
    return {"sampler_id": info.sampling_session_id, "base_model": info.base_model,
            "model_path": tinker_path(info.model_path) if info.model_path else None}


def run_result(info: RunInfo) -> pb.FutureResult:
    return pb.FutureResult(training_run=pb.TrainingRunInfo(training_run_id=info.training_run_id,
                                                           base_model=info.base_model))


def sampler_result(info: SamplerInfo) -> pb.FutureResult:
    return pb.FutureResult(sampling_session=pb.SamplingSessionInfo(
        sampling_session_id=info.sampling_session_id, base_model=info.base_model,
        model_path=info.model_path))


def result_response(result: pb.FutureResult) -> Response:
    """A finished request's result in the form the SDK expects for its kind."""
    kind = result.WhichOneof("result")
    if kind == "forward_backward":
        return Response(wire.forward_backward_to_proto(result.forward_backward), media_type=PROTO)
    if kind == "sample":
        return Response(wire.sample_to_proto(result.sample), media_type=PROTO)
    if kind == "compute_logprobs":
        return Response(wire.logprobs_to_proto(result.compute_logprobs), media_type=PROTO)
    if kind == "optim_step":
        return JSONResponse({"type": "optim_step", "metrics": dict(result.optim_step.metrics)})
    if kind == "save_weights":
        return JSONResponse({"path": tinker_path(result.save_weights.path)})
    if kind == "training_run":
        return JSONResponse({"model_id": result.training_run.training_run_id})
    if kind == "sampling_session":
        session = result.sampling_session
        return JSONResponse({"sampling_session_id": session.sampling_session_id,
                             "path": tinker_path(session.model_path) if session.model_path else None})
    raise AssertionError(f"a stored result of unknown kind {kind}")
