"""The personalization report from result rows: recovery and gain kept pooled over seeds, and a score
the run did not measure left out of the table rather than shown as zero."""

from stillroom_cookbook.recipes.personalization.report import summarize, table


def row(method, seed, instructions, cloze, start: str | None = "mid-train + chat mix", **extra):
    base = {"method": method, "seed": seed, "instructions": instructions, "cloze": cloze,
            "cloze_probability": cloze, "questions": None, "answer_probability": None, "looping": 0.0,
            "instructions_sampled": None, "steps": 8, "train_tokens": 100, "sampled_tokens": 0,
            "teacher_tokens": 0, "seconds": 1.0, "cpu_seconds": 1.0, "load": 1.0, "start": start}
    return {**base, **extra}


def test_recovery_is_pooled_over_seeds_and_unmeasured_scores_leave_the_table():
    rows = [row("base model", -1, 0.30, 0.10, start=None),
            row("mid-train + chat mix", 0, 0.10, 0.50, start="base model"),
            row("mid-train + chat mix", 1, 0.20, 0.30, start="base model"),
            # seed 0 wins back 0.15 of 0.20 lost, seed 1 0.05 of 0.10: pooled 0.20 / 0.30
            row("distill (exact reverse KL) + replay", 0, 0.25, 0.40, steps=32),
            row("distill (exact reverse KL) + replay", 1, 0.25, 0.30, steps=32)]
    summary = {e["method"]: e for e in summarize(rows)}
    distilled = summary["distill (exact reverse KL) + replay"]
    assert abs(distilled["if_recovered"] - 0.20 / 0.30) < 1e-9   # float64 sums of a few terms: ~1e-16
    # gained 0.40 + 0.20 over the base; kept 0.30 + 0.20
    assert abs(distilled["cloze_kept"] - 0.50 / 0.60) < 1e-9
    assert distilled["questions"] is None and distilled["questions_kept"] is None
    assert distilled["if_sampled_recovered"] is None
    text = table(list(summary.values()))
    header = text.splitlines()[0]
    assert "chat questions" not in header and "IF sampled" not in header and "chat gain" not in header
    assert "| distill (exact reverse KL) + replay | mid-train + chat mix | 2 | 32 |" in text
    assert "67%" in text and "83% / 83%" in text
