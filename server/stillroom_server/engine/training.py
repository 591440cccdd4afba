"""Training runs: gradients accumulated by forward_backward, applied by AdamW in optim_step.

A full run owns a copy of its base model. A LoRA run is one named adapter in its base model's
shared PEFT host (see lora.py), so many runs hold one copy of the base weights. A failed request
leaves no partial gradient behind: gradients are computed into fresh tensors and added only once
the whole batch has succeeded. Runs know nothing of request numbering or storage.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch

from stillroom_server.engine import compute
from stillroom_server.engine.losses import get_loss
from stillroom_server.engine.models import BaseModel
from stillroom_server.engine.types import AdamConfig, ForwardBackwardResult, ForwardBackwardWork, OptimResult


class TrainingRun(abc.ABC):
    def __init__(self, run_id: str, base: BaseModel, device: torch.device) -> None:
        self.run_id = run_id
        self.base = base
        self.device = device
        self.optimizer: torch.optim.AdamW | None = None
        self.accumulated_tokens = 0

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

    # ---------------------------------------------------------------- forward / backward

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        loss_spec = get_loss(work.loss_fn)
        config = loss_spec.resolve_config(work.loss_fn_config)
        model = self.activate()
        lengths = [d.tokens_T.shape[0] for d in work.data]
        tokens_B_T = compute.pad_right([d.tokens_T for d in work.data]).to(self.device)
        targets_B_T = compute.pad_right([d.inputs["target_tokens"] for d in work.data]).to(self.device)
        inputs = {key: compute.pad_right([d.inputs[key] for d in work.data]).to(self.device)
                  for key in loss_spec.inputs}
        mask_B_T = compute.lengths_mask(lengths, self.device)
        with torch.set_grad_enabled(not work.forward_only):
            logp_B_T = compute.target_logprobs(model, tokens_B_T, targets_B_T)
            loss, metrics = loss_spec.fn(logp_B_T, mask_B_T, inputs, config)
            if not work.forward_only:
                self._accumulate(loss)
                self.accumulated_tokens += sum(lengths)
        logp_B_T = logp_B_T.detach().cpu()
        outputs = [{"logprobs": logp_B_T[row, :n].clone()} for row, n in enumerate(lengths)]
        return ForwardBackwardResult(outputs, {"loss:sum": float(loss.detach()), **metrics})

    def _accumulate(self, loss: torch.Tensor) -> None:
        params = self.trainable_parameters()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)

    # ---------------------------------------------------------------- optimizer

    def optim_step(self, adam: AdamConfig) -> OptimResult:
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
        self.model = base.owned_copy(requires_grad=True)
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
