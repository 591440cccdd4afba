"""Training runs: gradients accumulated by forward_backward, applied by AdamW in optim_step.

A full run owns a copy of its base model. A LoRA run is one named adapter in its base model's
shared PEFT host (see lora.py), so many runs hold one copy of the base weights. A failed request
leaves no partial gradient behind: gradients are computed into fresh tensors and added only once
the whole batch has succeeded. Runs know nothing of request numbering or storage.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stillroom._metrics import merge_metrics  # the SDK's pure-python rule, shared with its split calls
from stillroom_server.engine.errors import FailedPrecondition
from stillroom_server.engine.models import BaseModel
from stillroom_server.engine.runtime.scheduler import pause
from stillroom_server.engine.sampling import compute
from stillroom_server.engine.training.losses import get_loss
from stillroom_server.engine.types import AdamConfig, ForwardBackwardResult, ForwardBackwardWork, OptimResult

# Padded tokens in one forward pass. Measured (scripts/bench_microbatch.py, char-10m, 32x512, 1 thread,
# 2-core VM): 1024: 291 tokens/s, 2048: 373, 4096: 325, 16384: 283 (its activations page-fault).
# It also bounds how long other work waits: the scheduler interleaves between micro-batches.
MICROBATCH_TOKENS = 2048
# ... and at most about this long on this machine, as the run last measured it (never below
# MIN_MICROBATCH_TOKENS): on a busy machine a 2048-token pass can take seconds. Not with
# `fixed_microbatches` (--batch-invariant): the split changes the gradient's float order, so a split
# that follows the machine's load made training runs part between two runs of the same script.
STEP_SECONDS = 0.5
MIN_MICROBATCH_TOKENS = 512


def microbatches(data: list, limit: int) -> list[list]:
    """Consecutive groups of datums whose padded size (count x longest) stays within `limit`."""
    groups, longest = [[]], 0
    for datum in data:
        n = datum.tokens_T.shape[0]
        if groups[-1] and (len(groups[-1]) + 1) * max(longest, n) > limit:
            groups.append([])
            longest = 0
        groups[-1].append(datum)
        longest = max(longest, n)
    return groups


def next_microbatch(data: list, start: int, limit: int) -> int:
    """The end of the group that starts at `start` under `microbatches`' rule."""
    end, longest = start, 0
    while end < len(data):
        n = data[end].tokens_T.shape[0]
        if end > start and (end - start + 1) * max(longest, n) > limit:
            break
        longest, end = max(longest, n), end + 1
    return end


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a.add_(b)


class TrainingRun(abc.ABC):
    def __init__(self, run_id: str, base: BaseModel, device: torch.device) -> None:
        self.run_id = run_id
        self.base = base
        self.device = device
        self.optimizer: torch.optim.AdamW | None = None
        self.accumulated_tokens = 0
        self._staged: list[torch.Tensor | None] | None = None   # a chunked call's parts so far
        self._staged_tokens = 0
        self._next_part = 0
        self._seconds_per_token = 0.0   # measured on this run's last micro-batch
        self.fixed_microbatches = False  # micro-batches by tokens alone, never by the time they took

    # ---------------------------------------------------------------- what subclasses provide

    @abc.abstractmethod
    def activate(self) -> torch.nn.Module:
        """Make this run's weights the live ones and return the module to call."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    @abc.abstractmethod
    def save_sampler_weights(self, directory: Path) -> None:
        """Write this run's current weights into `directory` (safetensors + JSON)."""

    @property
    @abc.abstractmethod
    def is_lora(self) -> bool: ...

    @property
    def lora_rank(self) -> int:
        return 0

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # ---------------------------------------------------------------- moving to disk and back

    @abc.abstractmethod
    def release(self) -> None:
        """Drop the weights and optimizer from memory (after they were saved to disk)."""

    @abc.abstractmethod
    def rebuild(self) -> None:
        """Make fresh weights to load a saved state into (the reverse of `release`)."""

    def memory_bytes(self) -> int:
        """What the run holds in memory: its trainable weights and their two AdamW moments (a full
        run's frozen copy counted too); 0 once released."""
        params = self.trainable_parameters()
        return 3 * sum(p.numel() * p.element_size() for p in params)

    def is_idle(self) -> bool:
        """Nothing in flight: no accumulated gradient and no held parts (safe to move to disk)."""
        return self._staged is None and all(p.grad is None for p in self.trainable_parameters())

    # ---------------------------------------------------------------- forward / backward

    def forward_backward(self, work: ForwardBackwardWork,
                         teacher: Callable[[], torch.nn.Module] | None = None) -> ForwardBackwardResult:
        """Compute the loss; unless `forward_only`, add its gradient (a chunked call's parts are
        held aside and added together when the last part succeeds). Large calls run as several
        micro-batches; the losses are sums over tokens, so the result is the same."""
        loss_spec = get_loss(work.loss_fn)
        config = loss_spec.resolve_config(work.loss_fn_config)
        grads, outputs, parts = None, [], []
        start = 0
        while start < len(work.data):
            if start:
                pause()  # other work may run here; it never touches this run (its lane waits)
            end = next_microbatch(work.data, start, self._microbatch_tokens())
            batch, began = work.data[start:end], time.perf_counter()
            model = self.activate()  # again: the other work may have activated another adapter
            loss, metrics, logprobs = self._batch_loss(model, batch, loss_spec, config, teacher,
                                                       work.forward_only)
            if not work.forward_only:
                batch_grads = self._gradients(loss)
                grads = batch_grads if grads is None else [_add(a, b) for a, b in zip(grads, batch_grads)]
            outputs.extend({"logprobs": row} for row in logprobs)
            parts.append(({"loss:sum": float(loss.detach()), **metrics}, sum(r.shape[0] for r in logprobs)))
            padded = (end - start) * max(d.tokens_T.shape[0] for d in batch)
            self._seconds_per_token = (time.perf_counter() - began) / padded
            start = end
        if not work.forward_only:
            assert grads is not None  # validation refuses empty data
            self._collect(grads, sum(n for _, n in parts), work.part, work.num_parts)
        return ForwardBackwardResult(outputs, merge_metrics(parts))

    def _microbatch_tokens(self) -> int:
        if not self._seconds_per_token or self.fixed_microbatches:
            return MICROBATCH_TOKENS
        timely = int(STEP_SECONDS / self._seconds_per_token)
        return min(MICROBATCH_TOKENS, max(MIN_MICROBATCH_TOKENS, timely))

    def _batch_loss(self, model, data, loss_spec, config, teacher, forward_only):
        """One padded forward pass over `data`: the loss, its metrics, each datum's logprobs."""
        lengths = [d.tokens_T.shape[0] for d in data]
        tokens_B_T = compute.pad_right([d.tokens_T for d in data]).to(self.device)
        targets_B_T = compute.pad_right([d.inputs["target_tokens"] for d in data]).to(self.device)
        inputs = {key: compute.pad_right([loss_spec.input_of(d.inputs, key) for d in data]).to(self.device)
                  for key in loss_spec.all_inputs}
        if loss_spec.needs_teacher:
            with torch.no_grad():
                # teacher() activates its adapter now: it may share a LoRA host with this run
                inputs["teacher_logprobs"] = torch.log_softmax(compute.logits_for(teacher(), tokens_B_T), -1)
            model = self.activate()  # the teacher may be another adapter of the same host
        mask_B_T = compute.lengths_mask(lengths, self.device)
        with torch.set_grad_enabled(not forward_only):
            logprobs_B_T_V = torch.log_softmax(compute.logits_for(model, tokens_B_T), dim=-1)
            # [B, T], or [B, T, K] where each position has K targets (cross_entropy's soft targets)
            logp_B_T = (logprobs_B_T_V.gather(-1, targets_B_T[..., None]).squeeze(-1)
                        if targets_B_T.dim() == 2 else logprobs_B_T_V.gather(-1, targets_B_T))
            if loss_spec.needs_teacher:
                inputs["student_logprobs"] = logprobs_B_T_V
            loss, metrics = loss_spec.fn(logp_B_T, mask_B_T, inputs, config)
        logp_B_T = logp_B_T.detach().cpu()
        return loss, metrics, [logp_B_T[row, :n].clone() for row, n in enumerate(lengths)]

    def _gradients(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, self.trainable_parameters(), allow_unused=True))

    def _collect(self, grads: list[torch.Tensor | None], tokens: int, part: int, num_parts: int) -> None:
        """Add a call's gradient, or hold a chunked call's parts until its last one succeeds."""
        if num_parts <= 1:
            self._staged = None
            self._add_to_grads(grads, tokens)
            return
        if part == 0:
            self._staged, self._staged_tokens = grads, 0
        elif self._staged is None or part != self._next_part:
            self._staged = None
            raise FailedPrecondition(f"part: part {part} of a chunked forward_backward came after an "
                                     "earlier part failed or was skipped; nothing of that call was applied")
        else:
            self._staged = [_add(s, g) for s, g in zip(self._staged, grads)]
        self._staged_tokens += tokens
        self._next_part = part + 1
        if part == num_parts - 1:
            staged, self._staged = self._staged, None
            self._add_to_grads(staged, self._staged_tokens)

    def _add_to_grads(self, grads: list[torch.Tensor | None], tokens: int) -> None:
        for param, grad in zip(self.trainable_parameters(), grads):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        self.accumulated_tokens += tokens

    # ---------------------------------------------------------------- optimizer

    def optim_step(self, adam: AdamConfig) -> OptimResult:
        self._staged = None  # an unfinished chunked call is dropped, never half-applied
        params = self.trainable_parameters()
        self.activate()
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=adam.learning_rate)
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if adam.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(params, adam.grad_clip_norm,
                                                torch.tensor(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"grad_norm:value": grad_norm, "accumulated_tokens:sum": float(self.accumulated_tokens),
                   "learning_rate:value": adam.learning_rate}
        self.accumulated_tokens = 0
        return OptimResult(metrics)


class FullRun(TrainingRun):
    """Full fine-tuning: every weight of a private copy of the base model is trained."""

    def __init__(self, run_id: str, base: BaseModel, device: torch.device) -> None:
        super().__init__(run_id, base, device)
        self.model: Any = base.owned_copy(requires_grad=True)
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def is_lora(self) -> bool:
        return False

    def activate(self) -> torch.nn.Module:
        return self.model

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def save_sampler_weights(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    def release(self) -> None:
        self.model, self._params, self.optimizer = torch.nn.Module(), [], None  # an empty stand-in

    def rebuild(self) -> None:
        self.model = self.base.owned_copy(requires_grad=True)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
