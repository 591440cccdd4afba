"""An IFEval-style instruction-following set: short writing tasks, each with one verifiable
constraint (word limit, all lowercase, a keyword, JSON only, an ending phrase, ...), graded by code.

Knows strings and a seed only: no tokens, models or server. Prompts are split by task topic, so the
evaluation's topics never appear in the prompts a recipe trains on.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable

TOPICS = ["the ocean", "a rainy morning", "your favourite book", "learning to cook", "city parks",
          "the moon", "a train journey", "winter", "friendship", "a busy market", "gardening",
          "mountains", "a new job", "music", "the night sky", "bicycles", "a small village", "coffee",
          "the library", "summer holidays", "a lost key", "birds", "a thunderstorm", "painting",
          "the first day of school", "rivers", "a birthday party", "old photographs", "the desert",
          "a quiet evening", "robots", "the harbor", "autumn leaves", "a long walk", "bread", "islands"]
KEYWORDS = ["lantern", "silver", "bridge", "orange", "whisper", "compass", "meadow", "velvet"]
ENDINGS = ["That is all.", "Thank you for reading.", "The end.", "Any questions?"]


@dataclasses.dataclass(frozen=True)
class Instruction:
    prompt: str
    kind: str
    check: Callable[[str], bool] = dataclasses.field(compare=False, repr=False)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _json_only(text: str) -> bool:
    body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return body.startswith(("{", "["))


def _constraints(rng: random.Random) -> list[tuple[str, str, Callable[[str], bool]]]:
    """(kind, instruction text, check) for each kind of constraint, with seeded parameters."""
    limit = rng.choice([20, 30, 40])
    keyword = rng.choice(KEYWORDS)
    ending = rng.choice(ENDINGS)
    first = rng.choice(["Today", "Imagine", "Honestly", "Once"])
    return [
        ("word_limit", f"Use fewer than {limit} words.", lambda t: 0 < len(_words(t)) < limit),
        ("lowercase", "Write your whole answer in lowercase letters only, no capitals.",
         lambda t: bool(t.strip()) and t == t.lower()),
        ("keyword", f"Include the word \"{keyword}\" in your answer.",
         lambda t: re.search(rf"\b{keyword}\b", t.lower()) is not None),
        ("json", "Answer with JSON only, an object with the key \"text\".", _json_only),
        ("ending", f"End your answer with the exact phrase \"{ending}\"",
         lambda t: t.strip().endswith(ending)),
        ("start_word", f"Start your answer with the word \"{first}\".",
         lambda t: t.strip().startswith(first)),
        ("no_commas", "Do not use any commas in your answer.", lambda t: bool(t.strip()) and "," not in t),
        ("uppercase", "Write your whole answer in capital letters.",
         lambda t: bool(t.strip()) and t == t.upper()),
    ]


def instructions(topics: list[str], seed: int) -> list[Instruction]:
    """Every constraint kind once per topic, with parameters drawn from `seed`."""
    rng = random.Random(seed)
    out = []
    for topic in topics:
        for kind, text, check in _constraints(rng):
            task = rng.choice(["Write a short paragraph about", "Describe", "Write a few sentences about"])
            out.append(Instruction(f"{task} {topic}. {text}", kind, check))
    return out


def split(num_eval_topics: int) -> tuple[list[Instruction], list[Instruction]]:
    """(train, eval): instructions over disjoint topics; the eval topics come first in TOPICS."""
    if not 1 <= num_eval_topics < len(TOPICS):
        raise ValueError(f"num_eval_topics: between 1 and {len(TOPICS) - 1}, got {num_eval_topics}")
    return instructions(TOPICS[num_eval_topics:], seed=1), instructions(TOPICS[:num_eval_topics], seed=2)


def follows(instruction: Instruction, reply: str) -> bool:
    return instruction.check(reply)
