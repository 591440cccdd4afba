"""A working directory where tinker-cookbook recipes find their data sets and models locally.

`datasets.load_dataset("org/name")` reads a local folder of that relative name when one exists in
the working directory, and the cookbook's `get_tokenizer(name)` loads a local folder of that name
first, so a recipe started there never asks the Hugging Face hub. This writes small, deterministic
stand-ins (printable ASCII only: the char presets' tokenizer covers nothing else) with the columns
the recipes read, and links model names to model folders. It knows nothing of the server.

    python tests/cookbook_data.py WORKDIR --model Qwen/Qwen3-8B-Base=/path/to/model/folder
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# openai/gsm8k has the configs "main" and "socratic"; a README's `configs` block names them locally.
GSM8K_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train.jsonl
---
"""


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _sums(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(count)]


def no_robots_rows(count: int = 16) -> list[dict]:
    """HuggingFaceH4/no_robots: `messages` (what sl_loop reads), `prompt`, `prompt_id`, `category`."""
    rows = []
    for index, (a, b) in enumerate(_sums(0, count)):
        prompt = f"What is {a} plus {b}?"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        rows.append({"prompt": prompt, "prompt_id": f"{index:04d}", "messages": messages,
                     "category": "Math"})
    return rows


def gsm8k_rows(count: int = 16) -> list[dict]:
    """openai/gsm8k, config main: `question` and `answer` ending in `#### <number>` (rl_loop)."""
    return [{"question": f"Tom has {a} apples and gets {b} more. How many now?",
             "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
            for a, b in _sums(1, count)]


def deepmath_rows(count: int = 16) -> list[dict]:
    """zwhe99/DeepMath-103K: `question` (the distillation prompts), `final_answer`."""
    return [{"question": f"What is {a} times {b}?", "final_answer": str(a * b)}
            for a, b in _sums(2, count)]


def write_workdir(root: Path, models: dict[str, Path]) -> Path:
    """Data sets under `root`, and `root/<name>` a link to each model folder; returns `root`."""
    _write_jsonl(root / "HuggingFaceH4/no_robots/train.jsonl", no_robots_rows())
    _write_jsonl(root / "openai/gsm8k/main/train.jsonl", gsm8k_rows())
    (root / "openai/gsm8k/README.md").write_text(GSM8K_README)
    _write_jsonl(root / "zwhe99/DeepMath-103K/train.jsonl", deepmath_rows())
    for name, folder in models.items():
        link = root / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(Path(folder).resolve(), target_is_directory=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="make WORKDIR/NAME a link to the model folder DIR (repeatable)")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.model)
    print(write_workdir(args.workdir, {name: Path(folder) for name, folder in models.items()}))


if __name__ == "__main__":
    main()
