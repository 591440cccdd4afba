"""The built-in token-level losses, as the Tinker SDK defines them: summed, never averaged.

Each loss gets the learner's target-token logprobs `logp_B_T` (with grad), a mask of the real
(unpadded) positions and the datums' padded inputs, and returns the loss and its metrics. Losses
know nothing of models or optimizers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from stillroom_server.engine.errors import InvalidInput

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, float]],
                  tuple[torch.Tensor, dict[str, float]]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    name: str
    inputs: tuple[str, ...]             # required loss_fn_inputs, besides target_tokens
    config_defaults: dict[str, float]
    fn: LossFn
    needs_teacher: bool = False         # gets full student and teacher distributions in `inputs`
    optional_inputs: dict[str, float] = dataclasses.field(default_factory=dict)  # key -> fill value
    soft_targets: bool = False          # takes [T, K] targets and inputs (K tokens at each position)

    @property
    def all_inputs(self) -> tuple[str, ...]:
        return (*self.inputs, *self.optional_inputs)

    def input_of(self, inputs: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        """A datum's input `key`, or an optional input's fill value at every position."""
        if key in inputs:
            return inputs[key]
        return torch.full(inputs["target_tokens"].shape, self.optional_inputs[key], dtype=torch.float32)

    def resolve_config(self, config: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(config) - set(self.config_defaults))
        if unknown:
            allowed = ", ".join(sorted(self.config_defaults)) or "none"
            raise InvalidInput(f"loss_fn_config: unknown key(s) {unknown} for loss '{self.name}' "
                               f"(allowed: {allowed})")
        resolved = {**self.config_defaults, **config}
        for key, value in resolved.items():
            if not torch.isfinite(torch.tensor(value)):
                raise InvalidInput(f"loss_fn_config.{key} must be finite, got {value}")
        if "clip_high_threshold" in resolved:
            low, high = resolved.get("clip_low_threshold", 0.0), resolved["clip_high_threshold"]
            if not 0 <= low <= 1 <= high:
                raise InvalidInput("loss_fn_config: need 0 <= clip_low_threshold <= 1 <= "
                                   f"clip_high_threshold, got {low} and {high}")
        if resolved.get("beta", 0.0) < 0:
            raise InvalidInput(f"loss_fn_config.beta must be >= 0, got {resolved['beta']}")
        topk = resolved.get("topk", 0.0)
        if topk < 0 or topk != int(topk):
            raise InvalidInput("loss_fn_config.topk must be a whole number >= 0 (0: full vocabulary), "
                               f"got {topk}")
        return resolved


def _ratio_metrics(ratio_B_T: torch.Tensor, mask_B_T: torch.Tensor, inputs: dict,
                   clipped_B_T=None) -> dict[str, float]:
    """Means over the positions being trained (a nonzero advantage): prompt positions carry
    placeholder sampler logprobs (0), whose ratios would say nothing about the policy's drift."""
    mask_B_T = mask_B_T * (inputs["advantages"] != 0)
    n = mask_B_T.sum().clamp(min=1)
    metrics = {"importance_ratio:mean": float((ratio_B_T.detach() * mask_B_T).sum() / n)}
    if clipped_B_T is not None:
        metrics["clip_fraction:mean"] = float((clipped_B_T.float() * mask_B_T).sum() / n)
    return metrics


def cross_entropy(logp_B_T, mask_B_T, inputs, config):
    """Also with K targets per position (`logp_B_T` and the weights [B, T, K]): soft targets, the
    weighted sum over each position's K tokens (top-k distillation)."""
    mask = mask_B_T if logp_B_T.dim() == 2 else mask_B_T[..., None]
    loss = -(logp_B_T * inputs["weights"] * mask).sum()
    return loss, {}


def importance_sampling(logp_B_T, mask_B_T, inputs, config):
    ratio_B_T = torch.exp(logp_B_T - inputs["logprobs"])
    loss = -(ratio_B_T * inputs["advantages"] * mask_B_T).sum()
    return loss, _ratio_metrics(ratio_B_T, mask_B_T, inputs)


def ppo(logp_B_T, mask_B_T, inputs, config):
    advantages_B_T = inputs["advantages"]
    ratio_B_T = torch.exp(logp_B_T - inputs["logprobs"])
    clipped_ratio_B_T = ratio_B_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    objective_B_T = torch.minimum(ratio_B_T * advantages_B_T, clipped_ratio_B_T * advantages_B_T)
    loss = -(objective_B_T * mask_B_T).sum()
    clipped_B_T = (clipped_ratio_B_T * advantages_B_T) < (ratio_B_T * advantages_B_T)
    return loss, _ratio_metrics(ratio_B_T, mask_B_T, inputs, clipped_B_T)


def cispo(logp_B_T, mask_B_T, inputs, config):
    ratio_B_T = torch.exp(logp_B_T - inputs["logprobs"])
    weight_B_T = ratio_B_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    loss = -(weight_B_T * logp_B_T * inputs["advantages"] * mask_B_T).sum()
    clipped_B_T = weight_B_T != ratio_B_T.detach()
    return loss, _ratio_metrics(ratio_B_T, mask_B_T, inputs, clipped_B_T)


def dro(logp_B_T, mask_B_T, inputs, config):
    drift_B_T = logp_B_T - inputs["logprobs"]
    objective_B_T = logp_B_T * inputs["advantages"] - config["beta"] / 2 * drift_B_T ** 2
    loss = -(objective_B_T * mask_B_T).sum()
    return loss, _ratio_metrics(torch.exp(drift_B_T), mask_B_T, inputs)


def gspo(logp_B_T, mask_B_T, inputs, config):
    """GSPO-token: each datum's sequence ratio (the geometric mean of its token ratios over the
    positions `sequence_ratio_mask` marks; every position when it is absent) as every token's
    value, each token keeping its own logprob's gradient; then PPO's clipped objective."""
    in_ratio_B_T = (inputs["sequence_ratio_mask"] != 0) & (mask_B_T != 0)
    drift_B_T = (logp_B_T.detach() - inputs["logprobs"]) * in_ratio_B_T
    log_ratio_B = drift_B_T.sum(-1) / in_ratio_B_T.sum(-1).clamp(min=1)
    ratio_B_T = torch.exp(log_ratio_B[:, None] + logp_B_T - logp_B_T.detach())
    advantages_B_T = inputs["advantages"]
    clipped_ratio_B_T = ratio_B_T.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    objective_B_T = torch.minimum(ratio_B_T * advantages_B_T, clipped_ratio_B_T * advantages_B_T)
    loss = -(objective_B_T * mask_B_T).sum()
    clipped_B_T = (clipped_ratio_B_T * advantages_B_T) < (ratio_B_T * advantages_B_T)
    return loss, _ratio_metrics(ratio_B_T, mask_B_T, inputs, clipped_B_T)


def stable_reinforce(logp_B_T, mask_B_T, inputs, config):
    """REINFORCE with a truncated importance weight: each token's gradient is its advantage times
    min(p/q, clip_high_threshold), the weight held constant (stop-gradient). The sampler's
    logprobs q come in `logprobs`; provenance spans are checked by the SDK, not used here."""
    ratio_B_T = torch.exp(logp_B_T - inputs["logprobs"])
    weight_B_T = ratio_B_T.clamp(max=config["clip_high_threshold"]).detach()
    loss = -(weight_B_T * logp_B_T * inputs["advantages"] * mask_B_T).sum()
    clipped_B_T = weight_B_T != ratio_B_T.detach()
    return loss, _ratio_metrics(ratio_B_T, mask_B_T, inputs, clipped_B_T)


def teacher_reverse_kl(logp_B_T, mask_B_T, inputs, config):
    """Exact reverse KL(student || teacher) of the next-token distributions at every weighted
    position, summed. With `topk` > 0 both distributions are renormalised over the student's
    top-k tokens at each position (for large vocabularies)."""
    student_B_T_V, teacher_B_T_V = inputs["student_logprobs"], inputs["teacher_logprobs"]
    topk = int(config["topk"])
    if 0 < topk < student_B_T_V.shape[-1]:
        index_B_T_K = student_B_T_V.detach().topk(topk, dim=-1).indices
        student_B_T_V = torch.log_softmax(student_B_T_V.gather(-1, index_B_T_K), dim=-1)
        teacher_B_T_V = torch.log_softmax(teacher_B_T_V.gather(-1, index_B_T_K), dim=-1)
    kl_B_T = (student_B_T_V.exp() * (student_B_T_V - teacher_B_T_V)).sum(-1)
    weights_B_T = inputs["weights"] * mask_B_T
    loss = (kl_B_T * weights_B_T).sum()
    mean_kl = (kl_B_T.detach() * weights_B_T).sum() / weights_B_T.sum().clamp(min=1e-12)
    return loss, {"teacher_kl:mean": float(mean_kl)}


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_RL_INPUTS = ("logprobs", "advantages")

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        # weights may be left out, as Tinker allows: every target counts once
        LossSpec("cross_entropy", (), {}, cross_entropy, optional_inputs={"weights": 1.0},
                 soft_targets=True),
        LossSpec("importance_sampling", _RL_INPUTS, {}, importance_sampling),
        LossSpec("ppo", _RL_INPUTS, dict(_CLIP), ppo),
        LossSpec("cispo", _RL_INPUTS, dict(_CLIP), cispo),
        LossSpec("dro", _RL_INPUTS, {"beta": 0.05}, dro),
        LossSpec("gspo", _RL_INPUTS, dict(_CLIP), gspo, optional_inputs={"sequence_ratio_mask": 1.0}),
        LossSpec("stable_reinforce", _RL_INPUTS, {"clip_high_threshold": 2.0}, stable_reinforce),
        LossSpec("teacher_reverse_kl", ("weights",), {"topk": 0.0}, teacher_reverse_kl,
                 needs_teacher=True),
    )
}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise InvalidInput(f"loss_fn: unknown loss '{name}' (known: {', '.join(LOSSES)})")
    return LOSSES[name]
