"""Preset models are made deterministically from their seed, load with plain transformers, and a
local Hugging Face directory works as a base model."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillroom import types
from stillroom_server.engine.models import presets

from conftest import TINY


def test_presets_are_deterministic_and_load_with_auto_classes(tmp_path):
    directory = presets.ensure_preset(TINY, tmp_path / "a")
    again = presets.ensure_preset(TINY, tmp_path / "b")
    model = AutoModelForCausalLM.from_pretrained(directory)
    other = AutoModelForCausalLM.from_pretrained(again)
    assert model.config.model_type == "qwen3"
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "Hello, world!\n\t~ {x}"
    assert tokenizer.decode(tokenizer.encode(text)) == text.replace("\t", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == model.config.vocab_size == 100


def test_the_10m_preset_is_about_ten_million_parameters():
    model = presets.build_preset_model(presets.PRESETS["stillroom/char-10m"])
    assert 8e6 < sum(p.numel() for p in model.parameters()) < 12e6


def test_a_local_model_directory_is_a_base_model(service, server, tmp_path):
    directory = presets.ensure_preset(TINY, tmp_path)
    sampler = service.create_sampling_client(base_model=str(directory))
    preset = service.create_sampling_client(base_model=TINY)
    tokens = types.ModelInput.from_ints([1, 40, 41, 42])
    assert sampler.compute_logprobs(tokens).result() == preset.compute_logprobs(tokens).result()
    trainer = service.create_lora_training_client(str(directory), rank=4)
    assert trainer.get_info().model_name == str(directory)
