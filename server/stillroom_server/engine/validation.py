"""What makes a request acceptable to the engine, checked before it is accepted: cheap, from model
facts (vocabulary, context, loss specs) and checkpoint metadata only, touching no weights.

`Validation` is a mixin: a class gives it `models` (a ModelHost), `files` (CheckpointFiles),
`max_num_samples`, `get_run(run_id)` (anything with `.base`, `.is_lora`) and `lora_meta(run)`. The
in-process engine and the engine processes' facade in the server process both validate with it, so a
request is refused the same way wherever its model lives. Knows no wire, owners or request numbers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from stillroom_server.engine import checkpoints
from stillroom_server.engine.errors import InvalidInput
from stillroom_server.engine.training.losses import get_loss
from stillroom_server.engine.types import ForwardBackwardWork, LogprobsWork, RunFacts, SampleWork

MAX_TARGETS = 1024         # token ids scored at one prompt position (target_prompt_logprobs)


@dataclasses.dataclass
class RunView:
    """A run whose weights are held elsewhere (by sharded workers, or an engine process): what
    validation and the core read of it, from its base model's facts and the engine's `RunFacts`."""
    run_id: str
    base: Any
    facts: RunFacts

    @property
    def is_lora(self) -> bool:
        return self.facts.is_lora

    @property
    def lora_rank(self) -> int:
        return self.facts.lora_rank

    def num_trainable_params(self) -> int:
        return self.facts.num_trainable_params

    def memory_bytes(self) -> int:
        return self.facts.memory_bytes


class Validation:
    models: Any
    files: checkpoints.CheckpointFiles
    max_num_samples: int

    def get_run(self, run_id: str) -> Any:
        raise NotImplementedError

    def lora_meta(self, run: Any) -> dict | None:
        raise NotImplementedError

    def state_meta(self, uri: str, field: str = "path") -> dict:
        """The meta of a saved training state; cheap (reads one JSON file)."""
        path = checkpoints.parse(uri, field)
        if path.kind != "weights":
            raise InvalidInput(f"{field}: {path.uri} is sampler weights, not a training state "
                               f"({checkpoints.SCHEME}<run_id>/weights/<name>, from save_state)")
        return self.files.read_meta(path)

    def validate_load_state(self, run_id: str, uri: str) -> None:
        run, meta = self.get_run(run_id), self.state_meta(uri)
        if meta["base_model"] != run.base.name or meta["is_lora"] != run.is_lora:
            raise InvalidInput(f"path: {uri} is a {meta['kind']} state of {meta['base_model']}; this run "
                               f"is a {'lora' if run.is_lora else 'full'} run of {run.base.name}")
        settings = self.lora_meta(run)
        if run.is_lora and meta["lora"] != settings:
            raise InvalidInput(f"path: {uri} has LoRA settings {meta['lora']}, this run {settings}")

    def validate_forward_backward(self, run_id: str, work: ForwardBackwardWork) -> None:
        run = self.get_run(run_id)
        spec = get_loss(work.loss_fn)
        spec.resolve_config(work.loss_fn_config)
        self._validate_strings(spec, run, work.loss_fn_config_strings)
        unsplit = work.num_parts == 0 and work.part == 0
        if work.num_parts < 0 or not (unsplit or 0 <= work.part < work.num_parts):
            raise InvalidInput(f"part: need 0 <= part < num_parts, got part {work.part} of {work.num_parts}")
        if not work.data:
            raise InvalidInput("data: at least one datum is needed")
        required = {"target_tokens", *spec.inputs}
        allowed = required | set(spec.optional_inputs)
        first_k: tuple[int, ...] = ()
        for i, datum in enumerate(work.data):
            field = f"data[{i}]"
            self._check_tokens(datum.tokens_T, f"{field}.model_input", run.base)
            missing = sorted(required - set(datum.inputs))
            if missing:
                raise InvalidInput(f"{field}.loss_fn_inputs: missing {missing} for loss '{work.loss_fn}'")
            extra = sorted(set(datum.inputs) - allowed)
            if extra:
                raise InvalidInput(f"{field}.loss_fn_inputs: unexpected {extra} for loss "
                                   f"'{work.loss_fn}' (expected {sorted(allowed)})")
            length = datum.tokens_T.shape[0]
            shape = _inputs_shape(spec, datum.inputs["target_tokens"], f"{field}.loss_fn_inputs", length)
            first_k = shape[1:] if i == 0 else first_k
            if shape[1:] != first_k:
                raise InvalidInput(f"{field}.loss_fn_inputs.target_tokens: {shape[1:]} targets per position, "
                                   f"data[0] has {first_k}: every datum of a call has the same K")
            for key, tensor in sorted(datum.inputs.items()):
                if tuple(tensor.shape) != shape:
                    raise InvalidInput(f"{field}.loss_fn_inputs.{key}: shape {list(tensor.shape)} does "
                                       f"not match model_input length {length}"
                                       + (f" and K {shape[1]}" if len(shape) == 2 else ""))
                if key == "target_tokens" and tensor.dim() == 2:
                    self._check_tokens(tensor.flatten(), f"{field}.loss_fn_inputs.target_tokens", run.base,
                                       limit=tensor.numel())
                elif key == "target_tokens":
                    self._check_tokens(tensor, f"{field}.loss_fn_inputs.target_tokens", run.base)
                elif tensor.is_floating_point():
                    if not torch.isfinite(tensor).all():
                        raise InvalidInput(f"{field}.loss_fn_inputs.{key}: values must be finite "
                                           "(found NaN or inf)")
                else:
                    raise InvalidInput(f"{field}.loss_fn_inputs.{key}: dtype must be float32")

    def _validate_strings(self, spec, run: Any, strings: dict[str, str]) -> None:
        allowed = {"teacher"} if spec.needs_teacher else set()
        unknown = sorted(set(strings) - allowed)
        if unknown:
            raise InvalidInput(f"loss_fn_config: unknown key(s) {unknown} for loss '{spec.name}'")
        if not spec.needs_teacher:
            return
        name = teacher_name(strings)
        if checkpoints.is_path(name):
            path = checkpoints.parse(name, "loss_fn_config.teacher")
            meta = self.files.read_meta(path)
            teacher_vocab = self.models.describe(meta["base_model"])["vocab_size"]
        else:
            teacher_vocab = self.models.describe(name)["vocab_size"]
        if teacher_vocab != run.base.vocab_size:  # the full vocabularies are compared when it runs
            raise other_tokenizer(name, teacher_vocab, run.base.vocab_size)

    def validate_sample(self, opened: Any, work: SampleWork) -> None:
        self._check_tokens(work.prompt_T, "prompt", opened.base, allow_full=False)
        params = work.params
        if not 1 <= work.num_samples <= self.max_num_samples:
            raise InvalidInput(f"num_samples: must be between 1 and {self.max_num_samples}, "
                               f"got {work.num_samples}")
        if params.max_tokens < -1 or params.max_tokens == 0:
            raise InvalidInput(f"sampling_params.max_tokens: must be >= 1 (or unset), "
                               f"got {params.max_tokens}")
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise InvalidInput(f"sampling_params.temperature: must be >= 0, got {params.temperature}")
        if not (0 < params.top_p <= 1):
            raise InvalidInput(f"sampling_params.top_p: must be in (0, 1], got {params.top_p}")
        if params.top_k == 0 or params.top_k < -1:
            raise InvalidInput(f"sampling_params.top_k: must be -1 (no limit) or >= 1, got {params.top_k}")
        for token in params.stop_tokens:
            if not 0 <= token < opened.vocab_size:
                raise InvalidInput(f"sampling_params.stop: token {token} is outside the vocabulary "
                                   f"[0, {opened.vocab_size})")
        if any(not text for text in params.stop_texts):
            raise InvalidInput("sampling_params.stop: stop strings must not be empty")
        if not 0 <= work.topk_prompt_logprobs <= 100:
            raise InvalidInput(f"topk_prompt_logprobs: must be between 0 and 100, "
                               f"got {work.topk_prompt_logprobs}")
        if not 0 <= work.topk_sample_logprobs <= 100:
            raise InvalidInput(f"topk_sample_logprobs: must be between 0 and 100, "
                               f"got {work.topk_sample_logprobs}")
        if work.target_prompt_ids_T_K is not None:
            self._check_targets(work.target_prompt_ids_T_K, work.prompt_T, opened.vocab_size)
        if work.prompt_logprobs_last_n is not None:
            if not (work.include_prompt_logprobs or work.topk_prompt_logprobs):
                raise InvalidInput("prompt_logprobs_last_n: needs include_prompt_logprobs or "
                                   "topk_prompt_logprobs")
            _check_last_n(work.prompt_logprobs_last_n, work.prompt_T, "prompt_logprobs_last_n")

    def validate_logprobs(self, opened: Any, work: LogprobsWork) -> None:
        self._check_tokens(work.tokens_T, "prompt", opened.base)
        if work.last_n is not None:
            _check_last_n(work.last_n, work.tokens_T, "prompt_logprobs_last_n")

    @staticmethod
    def _check_targets(ids_T_K: torch.Tensor, prompt_T: torch.Tensor, vocab_size: int) -> None:
        field = "target_prompt_logprobs"
        want = [prompt_T.shape[0] - 1, ids_T_K.shape[-1] if ids_T_K.dim() == 2 else 0]
        if ids_T_K.dtype != torch.long or list(ids_T_K.shape) != want or not 1 <= want[1] <= MAX_TARGETS:
            raise InvalidInput(f"{field}: must be int64 of shape [len(prompt) - 1, K] with 1 <= K <= "
                               f"{MAX_TARGETS}, got {str(ids_T_K.dtype).removeprefix('torch.')} "
                               f"{list(ids_T_K.shape)} for a prompt of {prompt_T.shape[0]} tokens")
        if ids_T_K.numel() and (int(ids_T_K.min()) < -1 or int(ids_T_K.max()) >= vocab_size):
            raise InvalidInput(f"{field}: ids must be -1 (nothing) or in the vocabulary [0, {vocab_size})")

    @staticmethod
    def _check_tokens(tokens_T: torch.Tensor, field: str, base: Any, allow_full: bool = True,
                      limit: int | None = None) -> None:
        """Token ids: int64, 1-D, 1 to `limit` of them (the context), each in the vocabulary."""
        if tokens_T.dtype != torch.long or tokens_T.dim() != 1:
            raise InvalidInput(f"{field}: tokens must be a 1-D int64 tensor")
        length = tokens_T.shape[0]
        if length == 0:
            raise InvalidInput(f"{field}: must hold at least one token")
        if limit is None:
            limit = int(base.max_context) if allow_full else int(base.max_context) - 1
        if length > limit:
            raise InvalidInput(f"{field}: {length} tokens is over the model's limit of {limit} "
                               f"(context length {base.max_context})")
        low, high = int(tokens_T.min()), int(tokens_T.max())
        if low < 0 or high >= base.vocab_size:
            bad = low if low < 0 else high
            raise InvalidInput(f"{field}: token id {bad} is outside the vocabulary [0, {base.vocab_size})")


def _inputs_shape(spec, targets: torch.Tensor, field: str, length: int) -> tuple[int, ...]:
    """The shape every loss input of a datum must have: [T], or [T, K] where a loss that takes
    soft targets gets K of them at each position."""
    if targets.dim() != 2:
        return (length,)
    if not spec.soft_targets:
        raise InvalidInput(f"{field}.target_tokens: shape {list(targets.shape)}: loss '{spec.name}' takes "
                           "one target per position ([T]); [T, K] targets are cross_entropy's")
    if not 1 <= targets.shape[1] <= MAX_TARGETS:
        raise InvalidInput(f"{field}.target_tokens: K must be between 1 and {MAX_TARGETS}, "
                           f"got shape {list(targets.shape)}")
    return (length, targets.shape[1])


def _check_last_n(last_n: int, tokens_T: torch.Tensor, field: str) -> None:
    if not 1 <= last_n <= tokens_T.shape[0] - 1:
        raise InvalidInput(f"{field}: must be between 1 and len(prompt) - 1 = {tokens_T.shape[0] - 1}, "
                           f"got {last_n}")



def teacher_name(strings: dict[str, str]) -> str:
    name = strings.get("teacher", "")
    if not name:
        raise InvalidInput("loss_fn_config.teacher: name the teacher (a base model or a "
                           "stillroom://.../sampler_weights/... path)")
    return name


def other_tokenizer(name: str, teacher_vocab: int, student_vocab: int) -> InvalidInput:
    return InvalidInput(
        f"loss_fn_config.teacher: {name} does not share the student's tokenizer (teacher vocabulary "
        f"{teacher_vocab} tokens, student {student_vocab}); teacher_reverse_kl compares next-token "
        "distributions token by token, so both models must use the same tokenizer")
