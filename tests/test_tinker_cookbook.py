"""tinker-cookbook 0.6.1, unmodified, against a real `stillroom serve` over Tinker's HTTP API.

Each recipe runs as its own process, as a user runs it (chz `key=value` arguments), for two steps
on the char presets: `recipes/sl_loop.py`, `recipes/rl_loop.py` and on-policy distillation
(`recipes/distillation/on_policy_distillation.py`: student char-1m, teacher char-10m). Data sets
and tokenizers come from a local working directory (tests/cookbook_data.py) with HF_HUB_OFFLINE=1,
so the hub is never reached. sl_loop and rl_loop pick their renderer from the model name and know
only hub names, so the server names char-1m `Qwen/Qwen3-8B-Base` (a base model: the plain-text
`role_colon` renderer); see docs/tinker_compat.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cookbook_data import write_workdir

pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is a test dependency (--no-deps)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ALIAS = "Qwen/Qwen3-8B-Base"   # the cookbook's name for a base model with the role_colon renderer
STUDENT, TEACHER = "stillroom/char-1m", "stillroom/char-10m"
RECIPE_TIMEOUT = 480


@pytest.fixture(scope="module")
def cookbook_server(tmp_path_factory):
    """A server that also answers to ALIAS with the char-1m preset's folder."""
    from stillroom_server.app import StillroomServer
    from stillroom_server.config import ServerConfig
    from stillroom_server.engine.models import presets

    data_dir = tmp_path_factory.mktemp("cookbook-server")
    char_1m = presets.ensure_preset(STUDENT, data_dir / "models")
    config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, local_models={ALIAS: char_1m})
    with StillroomServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def workdir(cookbook_server, tmp_path_factory) -> Path:
    models = cookbook_server.config.data_dir / "models"
    return write_workdir(tmp_path_factory.mktemp("cookbook-workdir"),
                         {ALIAS: models / STUDENT, STUDENT: models / STUDENT})


def run_recipe(server, workdir: Path, module: str, log_path: Path, **args) -> None:
    """`python -m <module> base_url=... key=value ...` in `workdir`, offline; fails with its output."""
    env = os.environ | {
        "TINKER_API_KEY": server.local_api_key, "TINKER_TELEMETRY": "0",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(workdir / ".hf-home"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [f"base_url={server.http_url}", f"log_path={log_path}", *(f"{k}={v}" for k, v in args.items())]
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=workdir, env=env, text=True,
                          capture_output=True, timeout=RECIPE_TIMEOUT)
    output = f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    assert done.returncode == 0, f"{module} exited {done.returncode}:\n{output}"
    # a long poll that ends pending is a quiet 408 (tinker 0.38 logged a 200 try_again as a warning)
    assert "because of try_again" not in done.stdout + done.stderr, output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_checkpoint(log_path: Path) -> dict:
    final = read_jsonl(log_path / "checkpoints.jsonl")[-1]
    assert final["name"] == "final", final
    assert final["state_path"].startswith("tinker://") and "/weights/final" in final["state_path"]
    return final


def test_sl_loop(cookbook_server, workdir, tmp_path):
    """Two supervised steps on the no_robots stand-in; the recipe's final checkpoint loads and scores."""
    import tinker

    log_path = tmp_path / "sl"
    run_recipe(cookbook_server, workdir, "tinker_cookbook.recipes.sl_loop", log_path,
               model_name=ALIAS, batch_size=4, max_steps=2, lora_rank=8, learning_rate=1e-3)
    steps = read_jsonl(log_path / "metrics.jsonl")
    assert [row["step"] for row in steps] == [0, 1]
    for row in steps:
        assert math.isfinite(row["train_mean_nll"]) and row["num_sequences"] == 4
        assert row["grad_norm:value"] > 0
    sampler_path = final_checkpoint(log_path)["sampler_path"]
    service = tinker.ServiceClient(base_url=cookbook_server.http_url, api_key=cookbook_server.local_api_key)
    sampler = service.create_sampling_client(model_path=sampler_path)
    logprobs = sampler.compute_logprobs(tinker.ModelInput.from_ints([5, 6, 7, 8])).result()
    assert logprobs[0] is None and all(x is not None and math.isfinite(x) for x in logprobs[1:])
    service.close("success").result()


def test_rl_loop(cookbook_server, workdir, tmp_path):
    """Two RL batches on the gsm8k stand-in: sampling with the renderer's stop string, grading,
    the final save. A random-init model never writes \\boxed{}, so every reward is 0 and the recipe
    skips its training step; test_rl_loop_training_datum sends that step's datum."""
    log_path = tmp_path / "rl"
    run_recipe(cookbook_server, workdir, "tinker_cookbook.recipes.rl_loop", log_path,
               model_name=ALIAS, batch_size=2, group_size=4, max_tokens=16, max_steps=2, lora_rank=8)
    steps = read_jsonl(log_path / "metrics.jsonl")
    assert [row["step"] for row in steps] == [0, 1]
    assert all(row["reward/total"] == 0.0 for row in steps)
    final_checkpoint(log_path)


def test_rl_loop_training_datum(cookbook_server):
    """rl_loop's training step as the recipe builds it: samples with sequence ids, datums with
    provenance spans (the recipe's own `with_sampled_provenance`), loss `stable_reinforce`."""
    import tinker
    import torch
    from tinker import types
    from tinker_cookbook.recipes.rl_loop import with_sampled_provenance

    service = tinker.ServiceClient(base_url=cookbook_server.http_url, api_key=cookbook_server.local_api_key)
    trainer = service.create_lora_training_client(base_model=ALIAS, rank=8).result()
    sampler = trainer.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = types.ModelInput.from_ints(list(range(10, 30)))
    params = types.SamplingParams(max_tokens=6, seed=1)
    sequences = sampler.sample(prompt, num_samples=2, sampling_params=params).result().sequences
    data = []
    for sequence, advantage in zip(sequences, (0.5, -0.5)):
        assert sequence.logprobs is not None
        ob_len = prompt.length - 1
        model_input = prompt.append(types.EncodedTextChunk(tokens=sequence.tokens[:-1]))
        inputs = {"target_tokens": [0] * ob_len + list(sequence.tokens),
                  "logprobs": [0.0] * ob_len + list(sequence.logprobs),
                  "advantages": [0.0] * ob_len + [advantage] * (model_input.length - ob_len)}
        datum = types.Datum(model_input=model_input, loss_fn_inputs={
            key: types.TensorData.from_torch(torch.tensor(value)) for key, value in inputs.items()})
        data.append(with_sampled_provenance(datum, prompt.length, len(sequence.tokens),
                                            sequence.sequence_id))
    result = trainer.forward_backward(data, loss_fn="stable_reinforce").result()
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    assert math.isfinite(result.metrics["loss:sum"])
    assert step.metrics is not None and step.metrics["grad_norm:value"] > 0
    service.close("success").result()


def test_on_policy_distillation(cookbook_server, workdir, tmp_path):
    """Two on-policy distillation steps, student char-1m, teacher char-10m (same tokenizer)."""
    log_path = tmp_path / "distill"
    run_recipe(cookbook_server, workdir, "tinker_cookbook.recipes.distillation.on_policy_distillation",
               log_path, model_name=STUDENT, renderer_name="role_colon", teacher_model=TEACHER,
               dataset="deepmath", group_size=2, groups_per_batch=2, max_tokens=16, lora_rank=8,
               max_steps=2, eval_every=0, save_every=0, behavior_if_log_dir_exists="delete")
    steps = read_jsonl(log_path / "metrics.jsonl")
    assert [row["step"] for row in steps] == [0, 1]
    for row in steps:
        assert math.isfinite(row["teacher_kl"]) and row["grad_norm:value"] > 0
        # the sampler's logprobs and the trainer's agree: the same weights on both sides (a few ulps
        # apart, ~1e-6; the estimate averages their differences)
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-3
    final_checkpoint(log_path)
