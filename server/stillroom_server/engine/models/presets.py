"""Built-in preset models: small Qwen3-style models with a character-level tokenizer.

A preset is made from a config and a seed, written once into `<data_dir>/models/<name>/` as an
ordinary Hugging Face model directory (config.json, model.safetensors, tokenizer.json), and read
back from there with `AutoModelForCausalLM` / `AutoTokenizer`. Building the same preset twice gives
bit-identical weights. This module knows nothing of training, sampling or where the models live.
"""

from __future__ import annotations

import dataclasses
import os
import string
import tempfile
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = "\n" + "".join(c for c in string.printable if c.isprintable())  # 95 printable + newline


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_context: int
    seed: int


PRESETS: dict[str, PresetSpec] = {
    spec.name: spec
    for spec in (
        PresetSpec("stillroom/char-1m", 128, 6, 4, 2, 32, 384, 512, seed=1),
        PresetSpec("stillroom/char-10m", 384, 6, 6, 2, 64, 1024, 512, seed=10),
    )
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_char_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable ASCII character and newline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=max(s.max_context for s in PRESETS.values()),
    )


def build_preset_model(spec: PresetSpec):
    """A freshly initialised Qwen3ForCausalLM for `spec`, deterministic in its seed."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab_size = len(SPECIAL_TOKENS) + len(CHARACTERS)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_context,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",  # pyright: ignore[reportCallIssue] - still read by transformers 5
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def ensure_preset(name: str, models_dir: Path) -> Path:
    """Write preset `name` under `models_dir` unless it is already there; return its directory."""
    spec = PRESETS[name]
    target = models_dir / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    build_preset_model(spec).save_pretrained(staging)
    build_char_tokenizer().save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        if not (target / "config.json").exists():
            raise
    return target
