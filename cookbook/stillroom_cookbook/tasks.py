"""Tasks with graders: problems as text, a worked reference completion, and a grader that reads a
completion back. A task knows text only, never tokens, models or the server.

The CPU demo's task is `IteratedMapTask`: apply x -> 3x+1 mod 100 six times to a two-digit start,
writing every value (`49:` -> `48 45 36 09 28 85 >85`). Why it:
- it is a chain of thought: each step is a two-digit multiply-add with a carry, and the answer is
  right only if all six are, so accuracy falls fast with a model's per-step error rate and the
  scratchpad is where a teacher's per-token signal lands (the answer has no easy shortcut: it is
  729x + 364 mod 100);
- each step reads only the value just before it, at a fixed distance, so a character-level model
  trained from random weights learns it on a CPU in minutes;
- at the same budget the 10M preset clearly beats the 1M one (measured, batch 32: after 100 SFT
  steps, 99% against 8%; the 1M reaches about 60% after 150), which leaves a gap for distillation
  to close;
- the student's samples go wrong in ways the teacher can grade: a wrong value early in the chain
  is followed by a correct chain from that value, so the teacher (if trained long enough to apply
  the map to values it did not expect, see DemoConfig) scores every later token meaningfully.
- answers are exact, and the grader needs no model.
There are only 100 problems (one per start): accuracy is measured on all of them, and what a model
must learn is the map itself, in the context after the prompt and inside the chain.
Two harder tasks did not fit a 10-minute CPU demo and are kept for larger budgets: `AdditionTask`
(multi-digit sums with carries, column by column) and `RunningSumTask` (running totals of a digit
list). Their steps read digits far back in the prompt, and after 150-250 SFT steps both presets
were still at or near chance.

Graders parse the integer after the last `>` marker, so a completion is judged on its answer alone.
"""

from __future__ import annotations

import abc
import dataclasses
import random
import re

ANSWER_MARKER = ">"
_ANSWER_RE = re.compile(re.escape(ANSWER_MARKER) + r"\s*(-?\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str        # what the model reads
    completion: str    # a worked, correct completion (the SFT target)
    answer: int


class Task(abc.ABC):
    """A task makes problems (`make_problem` from a seeded rng, or its own `problems`) and grades a
    completion on the answer after the last marker. Subclasses are frozen dataclasses with a `name`."""

    name: str

    @abc.abstractmethod
    def make_problem(self, rng: random.Random) -> Problem: ...

    @property
    @abc.abstractmethod
    def max_completion_chars(self) -> int:
        """Room for a worked completion and a little slack, for sampling's max_tokens."""

    def problems(self, n: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        return [self.make_problem(rng) for _ in range(n)]

    def grade(self, problem: Problem, completion: str) -> bool:
        return grade_answer(completion, problem.answer)


def grade_answer(completion: str, answer: int) -> bool:
    """True when the completion ends with the answer marker followed by `answer`."""
    match = _ANSWER_RE.search(completion.strip())
    return match is not None and int(match.group(1)) == answer


@dataclasses.dataclass(frozen=True)
class AdditionTask(Task):
    """Sums of two numbers of min_digits..max_digits digits each, worked column by column."""

    min_digits: int = 2
    max_digits: int = 3
    name: str = "addition"

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"AdditionTask: need 1 <= min_digits <= max_digits, got "
                             f"{self.min_digits} and {self.max_digits}")

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)

    def make_problem(self, rng: random.Random) -> Problem:
        a, b = self._operand(rng), self._operand(rng)
        width = self.max_digits
        return Problem(prompt=f"{a:0{width}d}+{b:0{width}d}=", completion=worked_addition(a, b, width),
                       answer=a + b)

    @property
    def max_completion_chars(self) -> int:
        return len(worked_addition(10 ** self.max_digits - 1, 10 ** self.max_digits - 1)) + 8


def worked_addition(a: int, b: int, width: int = 0) -> str:
    """`7+5+0=12 4+8+1=13 3+0+1=04 >432` for 347+85: one step per column (at least `width`
    columns), then the answer."""
    width = max(width, len(str(a)), len(str(b)))
    digits_a, digits_b = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry = [], 0
    for da, db in zip(digits_a, digits_b):
        total = int(da) + int(db) + carry
        steps.append(f"{da}+{db}+{carry}={total:02d}")
        carry = total // 10
    return " ".join(steps) + f" {ANSWER_MARKER}{a + b}"


@dataclasses.dataclass(frozen=True)
class RunningSumTask(Task):
    """Sums of min_terms..max_terms digits below `base`, taken modulo `base`, with the running total
    written after each term: each step is as wide as a term and its separator in the prompt."""

    min_terms: int = 6
    max_terms: int = 10
    base: int = 10
    name: str = "running-sum"

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms or not 2 <= self.base <= 10:
            raise ValueError(f"RunningSumTask: need 2 <= min_terms <= max_terms and 2 <= base <= 10, "
                             f"got {self.min_terms}, {self.max_terms}, {self.base}")

    def make_problem(self, rng: random.Random) -> Problem:
        terms = [rng.randrange(self.base) for _ in range(rng.randint(self.min_terms, self.max_terms))]
        return Problem(prompt=", ".join(map(str, terms)) + "=",
                       completion=worked_running_sum(terms, self.base), answer=sum(terms) % self.base)

    @property
    def max_completion_chars(self) -> int:
        return len(worked_running_sum([0] * self.max_terms, self.base)) + 4


def worked_running_sum(terms: list[int], base: int) -> str:
    """`8, 1, 6, 7 >7` for 8, 3, 5, 1 in base 10: the running total modulo `base` after each term,
    then the answer."""
    totals = [sum(terms[:i + 1]) % base for i in range(len(terms))]
    return ", ".join(map(str, totals)) + f" {ANSWER_MARKER}{totals[-1]}"


@dataclasses.dataclass(frozen=True)
class IteratedMapTask(Task):
    """Apply x -> (multiplier * x + increment) mod 100 `steps` times to a two-digit start, writing
    every value: `47:` -> `42 27 82 47 >47` (3x+1, four steps)."""

    steps: int = 6
    multiplier: int = 3
    increment: int = 1
    name: str = "iterated-map"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"IteratedMapTask: need steps >= 1, got {self.steps}")

    def values(self, start: int) -> list[int]:
        values, x = [], start
        for _ in range(self.steps):
            x = (self.multiplier * x + self.increment) % 100
            values.append(x)
        return values

    def problems(self, n: int, seed: int) -> list[Problem]:
        """There are only 100 problems (one per start), so `n` of them go through the starts in
        shuffled passes: any 100 in a row hold every start once."""
        rng, starts = random.Random(seed), []
        while len(starts) < n:
            batch = list(range(100))
            rng.shuffle(batch)
            starts += batch
        return [self.problem(start) for start in starts[:n]]

    def make_problem(self, rng: random.Random) -> Problem:
        return self.problem(rng.randrange(100))

    def problem(self, start: int) -> Problem:
        values = self.values(start)
        completion = " ".join(f"{v:02d}" for v in values) + f" {ANSWER_MARKER}{values[-1]}"
        return Problem(prompt=f"{start:02d}:", completion=completion, answer=values[-1])

    @property
    def max_completion_chars(self) -> int:
        return 3 * self.steps + 3 + 4
