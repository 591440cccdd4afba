"""Plain request and result types that cross between the service layer and the engine.

Tensors here are CPU torch tensors; the engine moves them to its device.
"""

from __future__ import annotations

import dataclasses
import uuid

import torch


@dataclasses.dataclass
class TrainDatum:
    tokens_T: torch.Tensor               # int64 [T]: the model's input
    inputs: dict[str, torch.Tensor]      # loss inputs, each [T]


@dataclasses.dataclass
class ForwardBackwardWork:
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool = False
    loss_fn_config_strings: dict[str, str] = dataclasses.field(default_factory=dict)
    part: int = 0                        # a chunked call's part, 0..num_parts-1
    num_parts: int = 0                   # 0: not chunked


@dataclasses.dataclass
class AdamConfig:
    """Every field comes from the request: the defaults live where requests are made (the SDK's
    types.AdamParams, which the HTTP API's body model extends)."""

    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float


@dataclasses.dataclass
class OptimWork:
    adam: AdamConfig


@dataclasses.dataclass
class SaveWork:
    name: str


@dataclasses.dataclass
class SamplingConfig:
    max_tokens: int                      # -1: up to the context length
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_texts: tuple[str, ...] = ()


@dataclasses.dataclass
class SampleWork:
    prompt_T: torch.Tensor               # int64 [T]
    num_samples: int
    params: SamplingConfig
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0        # top-k logprobs at every sampled position
    sequence_ids: tuple[str, ...] = ()   # one name per sample (the service's); empty: made here
    prompt_logprobs_last_n: int | None = None  # score only the prompt's last n tokens
    # int64 [T - 1, K]: row i names tokens to score at prompt position i + 1 (-1: none)
    target_prompt_ids_T_K: torch.Tensor | None = None


@dataclasses.dataclass
class LogprobsWork:
    tokens_T: torch.Tensor               # int64 [T]
    last_n: int | None = None         # score only the last n tokens; earlier entries are NaN


@dataclasses.dataclass
class ForwardBackwardResult:
    outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]


@dataclasses.dataclass
class OptimResult:
    metrics: dict[str, float]


@dataclasses.dataclass
class SaveResult:
    path: str


def new_sequence_id() -> str:
    return "seq-" + uuid.uuid4().hex


@dataclasses.dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str                      # "stop" | "length"
    topk_ids: list[list[int]] | None = None         # [n][k] when topk_sample_logprobs was asked
    topk_logprobs: list[list[float]] | None = None  # [n][k]
    sequence_id: str = dataclasses.field(default_factory=new_sequence_id)  # unique per server


@dataclasses.dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs_T: torch.Tensor | None = None   # float32 [T], entry 0 NaN
    topk_ids_T_K: torch.Tensor | None = None       # int64 [T, k], row 0 padding
    topk_logprobs_T_K: torch.Tensor | None = None  # float32 [T, k]
    target_logprobs_T_K: torch.Tensor | None = None  # float32 [T - 1, K]: 0.0 where the id was -1


@dataclasses.dataclass
class LogprobsResult:
    logprobs_T: torch.Tensor              # float32 [T], entry 0 NaN


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A LoRA run's settings: its rank and which layers get adapters."""
    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What the server keeps of a run an engine holds."""
    is_lora: bool
    lora_rank: int
    num_trainable_params: int
    lora_meta: dict | None
    memory_bytes: int = 0      # weights and AdamW moments; 0 where the engine states none (sharded)


@dataclasses.dataclass(frozen=True)
class SamplerFacts:
    """What the server keeps of a sampler an engine opened (its weights stay in the engine)."""
    key: str                   # "base:<model>" or "path:<uri>": samplers with one key share weights
    base_model: str
    adapter: str | None        # a LoRA snapshot's adapter name in the base's host
