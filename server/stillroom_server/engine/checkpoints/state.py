"""Training state: a run's weights plus its AdamW state, written and read without pickles.

A state directory holds the run's weights in its sampler format (a PEFT adapter for LoRA runs, a
Hugging Face model for full runs), `optimizer.safetensors` (each trainable parameter's `exp_avg`
and `exp_avg_sq`, keyed by a parameter name that does not depend on the run) and `optimizer.json`
(step counts and the last hyper-parameters). This module knows runs and files, not paths or owners.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stillroom_server.engine.errors import InvalidInput
from stillroom_server.engine.training import FullRun, TrainingRun

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def named_trainable(run: TrainingRun) -> list[tuple[str, torch.nn.Parameter]]:
    """The run's trainable parameters with names shared by every run of the same shape."""
    if isinstance(run, FullRun):
        return [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]
    lora: Any = run  # a LoraRun (lora.py imports this module's neighbours, not the other way)
    marker = f".{lora.adapter}."
    return [(name.replace(marker, "."), p) for name, p in lora.host.model.named_parameters()
            if marker in name]


def save_state(run: TrainingRun, directory: Path) -> None:
    """Write the run's weights and optimizer state into `directory`."""
    run.save_sampler_weights(directory)
    tensors, steps = {}, {}
    optimizer = run.optimizer
    for name, param in named_trainable(run):
        state = optimizer.state.get(param) if optimizer is not None else None
        if not state:
            continue
        for key in MOMENTS:
            tensors[f"{name}.{key}"] = state[key].detach().contiguous().cpu()
        steps[name] = float(state["step"])
    group = optimizer.param_groups[0] if optimizer is not None else None
    hyper = ({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
             if group is not None else None)
    save_file(tensors, str(directory / OPTIMIZER_TENSORS), metadata={"format": "pt"})
    (directory / OPTIMIZER_JSON).write_text(json.dumps({"steps": steps, "param_group": hyper},
                                                       indent=1))


def load_weights(run: TrainingRun, directory: Path) -> None:
    """Copy saved weights into the run's parameters in place (the optimizer keeps its handles)."""
    if isinstance(run, FullRun):
        state = load_file(str(directory / "model.safetensors"), device=str(run.device))
        with torch.no_grad():
            missing, unexpected = run.model.load_state_dict(state, strict=False)
        if unexpected or not all("lm_head" in k for k in missing):
            raise InvalidInput(f"path: the saved weights do not fit this run's model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        run.model.tie_weights()
        return
    from peft import set_peft_model_state_dict

    from stillroom_server.engine.adapters.lora import ADAPTER_WEIGHTS

    state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(run.device))
    with torch.no_grad():
        lora: Any = run
        result = set_peft_model_state_dict(lora.host.model, state, adapter_name=lora.adapter)
    if result.unexpected_keys:
        raise InvalidInput(f"path: the saved adapter does not fit this run "
                           f"(unexpected {list(result.unexpected_keys)[:3]})")


def load_optimizer(run: TrainingRun, directory: Path) -> None:
    """Rebuild the run's AdamW from saved moments and step counts (None if it had not stepped)."""
    saved = json.loads((directory / OPTIMIZER_JSON).read_text())
    if saved["param_group"] is None:
        run.optimizer = None
        return
    tensors = load_file(str(directory / OPTIMIZER_TENSORS), device=str(run.device))
    named = named_trainable(run)
    group = dict(saved["param_group"])
    group["betas"] = tuple(group["betas"])
    optimizer = torch.optim.AdamW([p for _, p in named], lr=group["lr"])
    state = {}
    for index, (name, _) in enumerate(named):
        if name in saved["steps"]:
            state[index] = {"step": torch.tensor(saved["steps"][name], dtype=torch.float32),
                            **{key: tensors[f"{name}.{key}"] for key in MOMENTS}}
    optimizer.load_state_dict({"state": state,
                               "param_groups": [{**group, "params": list(range(len(named)))}]})
    run.optimizer = optimizer


def restore(run: TrainingRun, directory: Path, with_optimizer: bool) -> None:
    """Load a state into `run`: weights always; the optimizer's moments, or fresh ones."""
    load_weights(run, directory)
    if with_optimizer:
        load_optimizer(run, directory)
    else:
        run.optimizer = None
    for param in run.trainable_parameters():
        param.grad = None
    run.accumulated_tokens = 0
    run._staged = None  # an unfinished chunked forward_backward is dropped, as optim_step does
