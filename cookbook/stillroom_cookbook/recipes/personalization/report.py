"""The personalization experiment's table (Markdown) and plot (PNG) from its result rows.

Knows dicts of numbers and file paths only. The plot has three panels: each method's question score
against its instruction-following score (mean over seeds, one faint dot per seed), the two
distillation losses' teacher KL by step (from their metrics logs, when given), and each method's
compute in tokens.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from stillroom_cookbook.metrics import read_jsonl
from stillroom_cookbook.recipes.personalization.evaluation import SAMPLED_REPLIES

METHODS = ["base model", "mid-train", "mid-train + chat mix", "distill (sampled estimate)",
           "distill (exact reverse KL)", "distill (sampled estimate) + replay",
           "distill (exact reverse KL) + replay", "distill (exact reverse KL), merged",
           "replay only (control)", "SFT on teacher samples"]
# each distillation row's metrics log: distill-{slug}-{seed}.jsonl
DISTILL_LOGS = {"distill (sampled estimate)": "sampled", "distill (exact reverse KL)": "teacher_reverse_kl",
                "distill (sampled estimate) + replay": "sampled-replay",
                "distill (exact reverse KL) + replay": "teacher_reverse_kl-replay",
                "distill (exact reverse KL), merged": "teacher_reverse_kl-merged"}


def summarize(rows: list[dict]) -> list[dict]:
    """Per method: means and spreads over seeds, compute, and the recovery against the mid-training
    it started from (a row's `start`; rows without one started from plain mid-training)."""
    by_method = {m: [r for r in rows if r["method"] == m] for m in METHODS}
    base = by_method["base model"]
    out = []
    for method, group in by_method.items():
        if not group:
            continue
        entry = {"method": method, "seeds": len(group)}
        for key in ("questions", "answer_probability", "cloze", "cloze_probability", "instructions",
                    "looping", "instructions_sampled", "steps", "train_tokens", "sampled_tokens",
                    "teacher_tokens", "seconds", "cpu_seconds", "load"):
            if any(r.get(key) is None for r in group):   # a score this run did not measure
                entry[key] = entry[key + "_sd"] = None
                continue
            values = [float(r[key]) for r in group]
            entry[key] = statistics.mean(values)
            entry[key + "_sd"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        start = group[0].get("start") or "mid-train"
        entry["start"] = start
        if base and start != "base model" and method != "base model" and by_method.get(start):
            entry.update(_recovery(base[0], by_method[start], group))
        out.append(entry)
    return out


def _recovery(base: dict, mid: list[dict], group: list[dict]) -> dict:
    """Instruction following recovered (of what mid-training lost) and knowledge gain kept (of what
    mid-training gained over the base model), pooled over the seeds: the summed change of each seed
    against its own mid-training, over the summed loss (gain); None where the mid-training lost
    (gained) nothing in sum, or where a score was not measured. Pooled, not a mean of per-seed
    ratios: a seed whose mid-training lost one prompt would make its ratio pure noise. The gain is
    measured on the cloze probe's accuracy and true-value probability, and on the chat questions'
    accuracy."""
    mid_by_seed = {r["seed"]: r for r in mid}
    pairs = [(row, mid_by_seed[row["seed"]]) for row in group if row["seed"] in mid_by_seed]

    def share(key: str, lost: bool) -> float | None:
        if any(r.get(key) is None for pair in pairs for r in pair) or base.get(key) is None:
            return None
        sign = 1.0 if lost else -1.0   # recovered: (row - start) / (base - start); kept: (row - base) / ...
        moved = sum(sign * (base.get(key, 0.0) - start.get(key, 0.0)) for _, start in pairs)
        if moved <= 0:
            return None
        if lost:
            return sum(row.get(key, 0.0) - start.get(key, 0.0) for row, start in pairs) / moved
        return sum(row.get(key, 0.0) - base.get(key, 0.0) for row, _ in pairs) / moved

    out = {"if_recovered": share("instructions", True),
           "if_sampled_recovered": share("instructions_sampled", True)}
    out.update({f"{key}_kept": share(key, False) for key in ("cloze", "cloze_probability", "questions")})
    return out


# the table's columns: (header, cell), in order; a column whose cells are all "—" (a score the run did
# not measure) is left out
COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("method", lambda e: e["method"]),
    ("starts from", lambda e: "—" if e["method"] == "base model" else e["start"]),
    ("seeds", lambda e: str(e["seeds"])),
    ("steps", lambda e: "—" if e["method"] == "base model" or e["steps"] is None else f"{e['steps']:.0f}"),
    ("cloze probe right (of 10)", lambda e: _pm(e, "cloze")),
    ("cloze p(true value)", lambda e: _pm(e, "cloze_probability")),
    ("chat questions right (of 10)", lambda e: _pm(e, "questions")),
    ("chat p(true value)", lambda e: _pm(e, "answer_probability")),
    ("instruction following (greedy)", lambda e: _pm(e, "instructions")),
    ("replies that loop", lambda e: _pm(e, "looping")),
    ("IF sampled (T=1)", lambda e: _pm(e, "instructions_sampled")),
    ("IF recovered", lambda e: _pct(e.get("if_recovered"))),
    ("IF sampled recovered", lambda e: _pct(e.get("if_sampled_recovered"))),
    ("cloze gain kept (right / p)",
     lambda e: f"{_pct(e.get('cloze_kept'))} / {_pct(e.get('cloze_probability_kept'))}"),
    ("chat gain kept", lambda e: _pct(e.get("questions_kept"))),
    ("train tokens", lambda e: f"{e['train_tokens']:,.0f}"),
    ("sampled tokens", lambda e: f"{e['sampled_tokens']:,.0f}"),
    ("teacher tokens", lambda e: f"{e['teacher_tokens']:,.0f}"),
    ("seconds", lambda e: f"{e['seconds']:.0f}"),
    ("CPU-seconds", lambda e: f"{e['cpu_seconds']:.0f}"),
]


def table(summary: list[dict]) -> str:
    cells = [[cell(e) for e in summary] for _, cell in COLUMNS]
    kept = [i for i, column in enumerate(cells) if any(c.strip("—/ ") for c in column)]
    lines = ["| " + " | ".join(COLUMNS[i][0] for i in kept) + " |", "|" + "---|" * len(kept)]
    lines += ["| " + " | ".join(cells[i][row] for i in kept) + " |" for row in range(len(summary))]
    return "\n".join(lines)


def _pm(entry: dict, key: str) -> str:
    if entry[key] is None:
        return "—"
    sd = entry[key + "_sd"]
    return f"{100 * entry[key]:.1f}%" + (f" ± {100 * sd:.1f}" if entry["seeds"] > 1 else "")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{round(100 * value)}%"   # an int: no "-0%"


def plot(rows: list[dict], summary: list[dict], path: Path, log_dir: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8),
                                              gridspec_kw={"width_ratios": [1.3, 1, 1]})
    _plot_teacher_kl(middle, rows, log_dir)
    for e in summary:
        color = f"C{METHODS.index(e['method'])}"
        seeds = [r for r in rows if r["method"] == e["method"]]
        left.scatter([100 * r.get("cloze", 0.0) for r in seeds], [100 * r["instructions"] for r in seeds],
                     color=color, alpha=0.3, s=20)
        left.scatter(100 * e["cloze"], 100 * e["instructions"], color=color, s=90, label=e["method"],
                     marker="*" if e["method"] == "base model" else "o", edgecolor="black")
    base = next((e for e in summary if e["method"] == "base model"), None)
    if base is not None:
        left.axhline(100 * base["instructions"], color="gray", linestyle=":", linewidth=1)
    left.axvline(10, color="gray", linestyle="--", linewidth=1)
    top = max([100 * r["instructions"] for r in rows] + [0.0])
    left.set_ylim(0, top * 1.55 + 5)   # room above the points for the legend
    left.text(10.3, 0, " chance", color="gray", fontsize=8, va="bottom")
    if base is not None:
        left.text(100 * base["cloze"] + 1.5, 100 * base["instructions"], "base model's instruction following",
                  color="gray", fontsize=8, ha="left", va="bottom")
    left.set(xlabel="facts known in an unseen sentence form: true value likeliest of 10 (%)",
             ylabel="instruction prompts followed (%)",
             title="Knowledge vs instruction following\n(up and right is better; big = mean, faint = seeds)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper right", ncol=2)
    names = [e["method"] for e in summary]
    train = [e["train_tokens"] / 1000 for e in summary]
    sampled = [e["sampled_tokens"] / 1000 for e in summary]
    teacher = [e["teacher_tokens"] / 1000 for e in summary]
    right.barh(names, train, label="trained (forward+backward)")
    right.barh(names, sampled, left=train, label="sampled")
    right.barh(names, teacher, left=[a + b for a, b in zip(train, sampled)], label="scored by teacher")
    right.set(xlabel="thousand tokens per seed (mean)", title="Compute per method (beyond its start)")
    right.invert_yaxis()
    right.legend(fontsize=8)
    seeds = len({r["seed"] for r in rows if r["seed"] >= 0})
    merged = any(e["method"].endswith(", merged") for e in summary)
    fig.suptitle("SmolLM2-135M-Instruct mid-trained with LoRA on internal documents (+ chat mix: with chat "
                 "replies mixed in), then trained on from the chat-mix run:\n"
                 "distilled toward the original model"
                 + (" (merged: a fresh LoRA on its merged weights)" if merged else "")
                 + ", fine-tuned on its replies, or (control) on the documents alone. "
                 f"Which keeps the facts and the assistant? ({seeds} seed{'s' if seeds != 1 else ''})",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_teacher_kl(ax, rows: list[dict], log_dir: Path | None) -> None:
    """Per distillation loss and seed: the student's KL to the teacher on its own samples, by step."""
    seeds = sorted({r["seed"] for r in rows if r["seed"] >= 0})
    for label, loss in DISTILL_LOGS.items():
        color = f"C{METHODS.index(label)}"
        for seed in seeds:
            path = log_dir / f"distill-{loss}-{seed}.jsonl" if log_dir else None
            if path is None or not path.exists():
                continue
            records = [r for r in read_jsonl(path) if "teacher_kl" in r]
            ax.plot([r["step"] for r in records], [r["teacher_kl"] for r in records], color=color,
                    marker="o", markersize=3, label=label if seed == seeds[0] else None)
    ax.set(xlabel="distillation step", ylabel="KL(student || base model), nats per token",
           title="Distance to the teacher on the student's samples\n(one line per seed)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def write_report(rows: list[dict], out_dir: Path, wall_seconds: float, log_dir: Path | None = None,
                 cpu_seconds: float | None = None, mean_load: float | None = None) -> None:
    summary = summarize(rows)
    cpu = "" if cpu_seconds is None else f", {cpu_seconds / 60:.1f} CPU-minutes (client + server)"
    load = "" if mean_load is None else f", mean 1-minute load average {mean_load:.1f}"
    replies = "reply" if SAMPLED_REPLIES == 1 else "replies"
    text = (f"{table(summary)}\n\nWall time {wall_seconds / 60:.1f} min{cpu}{load}. "
            "IF recovered: of the instruction following the row's starting mid-training lost against the "
            "base model, the share won back; gain kept: of the accuracy (and true-value probability) that "
            "mid-training gained over the base model, the share still there; — where it lost or gained "
            "nothing (each seed against that seed's starting mid-training, pooled: summed changes over "
            "summed losses or gains). Replies that loop: a word 3-gram three "
            "times or more in a greedy instruction reply."
            + (f" IF sampled: the same prompts, {SAMPLED_REPLIES} {replies} each at temperature 1."
               if any(e["instructions_sampled"] is not None for e in summary) else "")
            + " + replay: each distillation step also trains on a few mid-training documents "
            "(cross-entropy, in the same update), which the post's recipe does not.\n")
    (out_dir / "personalization_table.md").write_text(text)
    plot(rows, summary, out_dir / "personalization.png", log_dir)
