"""The on-policy distillation paper's comparison at CPU scale: from one teacher and one student start,
SFT on teacher samples, RL with a correctness reward, on-policy distillation (sampled-token KL) and,
where the server offers it, the exact server-side `teacher_reverse_kl`; accuracy against student
steps and against estimated FLOPs (6*N per trained token, 2*N per sampled or scored token).

Knows the demo's setup (distillation_demo) and the library loops; writes a markdown table and plots.
It does not time anything: compute is counted in tokens, so the result does not depend on the machine.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

import stillroom
from stillroom_cookbook.distillation import distill
from stillroom_cookbook.evaluation import TaskEvaluator
from stillroom_cookbook.metrics import MetricsLog, plot_curves
from stillroom_cookbook.recipes.distillation_demo import (
    DemoConfig,
    demo_evaluator,
    get_teacher,
    student_start,
)
from stillroom_cookbook.renderers import CharRenderer
from stillroom_cookbook.rl import RLConfig, train_rl
from stillroom_cookbook.rollouts import sample_groups
from stillroom_cookbook.supervised import SFTConfig, train_sft

METHODS = {"sft": "SFT on teacher samples", "rl": "RL (correctness reward)",
           "distill": "on-policy distillation", "distill_exact": "on-policy distillation (exact KL)"}


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    demo: DemoConfig = DemoConfig()
    steps: int = 60
    eval_every: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    # every method sees the demo's distillation batch per step (128 sequences), its learning rate
    # and warm-up; RL needs groups, so it samples 32 prompts x 4
    rl_group_size: int = 4
    target_fraction: float = 0.9        # "reached" = this fraction of the teacher's accuracy
    # Each method's own learning rate (method -> lr); a method not named uses the demo's
    # distillation rate. LEARNING_RATES holds the values the recorded sweep picked (docs/cookbook.md).
    learning_rates: tuple[tuple[str, float], ...] = ()

    def learning_rate(self, method: str) -> float:
        return dict(self.learning_rates).get(method, self.demo.distillation.learning_rate)

    def __post_init__(self) -> None:
        unknown = (set(self.methods) | {m for m, _ in self.learning_rates}) - set(METHODS)
        if unknown or not self.seeds or self.steps < 1:
            raise ValueError(f"ComparisonConfig: methods from {sorted(METHODS)}, at least one seed "
                             f"and one step; got {self.methods}, {self.seeds}, {self.steps}")


@dataclasses.dataclass
class Setup:
    service: stillroom.ServiceClient
    config: ComparisonConfig
    teacher: stillroom.SamplingClient
    teacher_params: int
    student_start: str          # the saved training state every run starts from
    student_params: int
    renderer: CharRenderer
    evaluator: TaskEvaluator
    out_dir: Path


def run_method(setup: Setup, method: str, seed: int) -> list[tuple[int, float, float]]:
    """(step, accuracy, cumulative FLOPs) at every evaluation of one run, from the shared start
    with a fresh optimizer."""
    config, demo, renderer = setup.config, setup.config.demo, setup.renderer
    student = setup.service.create_training_client_from_state(setup.student_start)
    name = f"{method}-seed{seed}"
    log = MetricsLog(setup.out_dir / f"{name}.jsonl")
    d = demo.distillation
    per_step = d.groups_per_batch * d.group_size
    base: dict[str, Any] = dict(steps=config.steps, learning_rate=config.learning_rate(method),
                warmup_steps=d.warmup_steps,
                eval_every=config.eval_every, seed=seed, name=name)
    problems = demo.task.problems(4096, seed=1000 * seed + 3)
    sample_flops_per_step = 0.0
    if method == "sft":
        examples, teacher_tokens = teacher_samples(setup, problems[:config.steps * per_step], d.max_tokens,
                                                   seed)
        sft = SFTConfig(batch_size=per_step, final_lr_fraction=1.0, **base)
        train_sft(student, renderer, examples, sft, log, setup.evaluator, progress=False)
        sample_flops_per_step = 2 * setup.teacher_params * teacher_tokens / config.steps
    elif method == "rl":
        rl = RLConfig(groups_per_batch=max(1, per_step // config.rl_group_size),
                      group_size=config.rl_group_size, max_tokens=d.max_tokens, **base)
        train_rl(student, renderer, problems, lambda p, text: float(demo.task.grade(p, text)), rl, log,
                 setup.evaluator, progress=False)
    else:
        loss = "teacher_reverse_kl" if method == "distill_exact" else "sampled"
        distill(student, setup.teacher, renderer, [p.prompt for p in problems],
                dataclasses.replace(d, loss=loss, **base), log, setup.evaluator, progress=False)
    return curve_with_flops(log.records, setup.student_params, setup.teacher_params, sample_flops_per_step)


def teacher_samples(setup: Setup, problems, max_tokens: int, seed: int):
    """One teacher completion (temperature 1) per problem; and the tokens it sampled."""
    prompts, groups = [p.prompt for p in problems], []
    for i in range(0, len(prompts), 256):       # a few hundred requests in flight at a time
        groups += sample_groups(setup.teacher, setup.renderer, prompts[i:i + 256], 1, max_tokens,
                                seed=seed * 100_000 + i)
    examples = [(prompt, setup.renderer.decode(g[0].tokens)) for prompt, g in zip(prompts, groups)]
    return examples, sum(len(g[0].all_tokens) for g in groups)


def curve_with_flops(records: list[dict], n_student: int, n_teacher: int,
                     extra_per_step: float) -> list[tuple[int, float, float]]:
    """Cumulative FLOPs at each evaluation: 6*N_student per trained token, 2*N_student per sampled
    token, 2*N_teacher per teacher-scored token, plus `extra_per_step` (teacher sampling for SFT)."""
    flops, by_step = 0.0, {}
    for r in sorted(records, key=lambda r: r["step"]):
        if "train_tokens" in r:
            flops += (6 * n_student * r["train_tokens"] + 2 * n_student * r.get("sampled_tokens", 0)
                      + 2 * n_teacher * r.get("teacher_tokens", 0) + extra_per_step)
            by_step[r["step"] + 1] = flops      # after the step's update
    return [(r["step"], r["eval/accuracy"], by_step.get(r["step"], 0.0))
            for r in records if "eval/accuracy" in r]


def first_reaching(curve: Sequence[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(step, FLOPs) of the first evaluation at or above `target`, or None."""
    return next(((step, flops) for step, acc, flops in curve if acc >= target), None)


def run_comparison(service: stillroom.ServiceClient, config: ComparisonConfig, out_dir: Path,
                   teacher_cache_dir: Path, docs_dir: Path, command: str) -> str:
    """Every method for every seed; writes the table (markdown) and plots into docs_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = config.demo
    teacher_path, teacher_params = get_teacher(service, demo, teacher_cache_dir)
    teacher = service.create_sampling_client(model_path=teacher_path)
    student = service.create_full_training_client(demo.student_model, seed=demo.seed)
    renderer = CharRenderer(student.get_tokenizer())
    evaluator = demo_evaluator(demo, renderer)
    start_path = student_start(student, renderer, demo, evaluator, out_dir)
    setup = Setup(service, config, teacher, teacher_params, start_path,
                  student.get_info().num_trainable_params, renderer, evaluator, out_dir)
    teacher_accuracy = evaluator(teacher)["eval/accuracy"]
    methods = [m for m in config.methods if m != "distill_exact"
               or "teacher_reverse_kl" in service.get_server_capabilities().loss_fns]
    curves = {}
    with tqdm(total=len(methods) * len(config.seeds), desc="comparison", unit="run") as bar:
        for method in methods:
            curves[method] = []
            for seed in config.seeds:
                curves[method].append(run_method(setup, method, seed))
                bar.update()
                bar.set_postfix(last=f"{method} seed {seed}: {curves[method][-1][-1][1]:.0%}")
    return write_report(config, curves, teacher_accuracy, docs_dir, command)


def mean_curve(runs: list[list[tuple[int, float, float]]]) -> list[tuple[int, float, float]]:
    return [(points[0][0], statistics.mean(p[1] for p in points), statistics.mean(p[2] for p in points))
            for points in zip(*runs)]


def write_report(config: ComparisonConfig, curves: dict, teacher_accuracy: float, docs_dir: Path,
                 command: str) -> str:
    target = config.target_fraction * teacher_accuracy
    start = statistics.mean(runs[0][0][1] for runs in curves.values())
    rows = []
    for method, runs in curves.items():
        finals = [run[-1][1] for run in runs]
        reached = [first_reaching(run, target) for run in runs]
        hit = [r for r in reached if r is not None]
        when = (f"{statistics.mean(s for s, _ in hit):.0f} | {statistics.mean(f for _, f in hit):.2e}"
                if hit else "not reached | not reached")
        rows.append(f"| {METHODS[method]} | {config.learning_rate(method):.0e} "
                    f"| {statistics.mean(finals):.1%} ± {statistics.pstdev(finals):.1%} "
                    f"| {len(hit)}/{len(runs)} | {when} | {mean_curve(runs)[-1][2]:.2e} |")
    means = {METHODS[m]: mean_curve(runs) for m, runs in curves.items()}
    stem = docs_dir / "distillation_comparison"
    plot_curves({k: [(s, a) for s, a, _ in c] for k, c in means.items()}, Path(f"{stem}_steps.png"),
                title="student accuracy by training step", xlabel="student step",
                ylabel="accuracy (greedy)", hlines={"teacher": teacher_accuracy, "90% of teacher": target})
    plot_curves({k: [(f, a) for _, a, f in c if f > 0] for k, c in means.items()}, Path(f"{stem}_flops.png"),
                title="student accuracy by estimated compute", xlabel="FLOPs (6N train + 2N sample/score)",
                ylabel="accuracy (greedy)", hlines={"teacher": teacher_accuracy, "90% of teacher": target},
                logx=True)
    table = "\n".join([
        f"Teacher {config.demo.teacher_model}: {teacher_accuracy:.1%}; student start "
        f"({config.demo.student_model} after SFT): {start:.1%}; target {target:.1%} "
        f"({config.target_fraction:.0%} of the teacher). {len(config.seeds)} seeds, {config.steps} steps, "
        f"{config.demo.eval_problems} problems.", "",
        f"| method | learning rate | final accuracy (mean ± sd) | runs reaching target | steps to target | "
        f"FLOPs to target | FLOPs for {config.steps} steps |",
        "|---|---|---|---|---|---|---|", *rows])
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "distillation_comparison.md").write_text(
        f"# On-policy distillation vs SFT vs RL, at CPU scale\n\nRegenerate with:\n\n"
        f"```bash\n{command}\n```\n\n{table}\n\n"
        f"![accuracy by step](distillation_comparison_steps.png)\n"
        f"![accuracy by compute](distillation_comparison_flops.png)\n")
    return table
