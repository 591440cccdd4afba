"""On-policy distillation on a CPU: a 10M teacher teaches a 1M student a step-by-step calculation.

    python -m stillroom_cookbook.recipes.distillation_demo [--data-dir .stillroom] [--retrain-teacher]

Starts a server on the data dir; trains the teacher (stillroom/char-10m) with SFT on worked
chains of x -> 3x+1 mod 100 (tasks.IteratedMapTask), or reuses the one cached in
<data-dir>/cookbook/teacher.json; gives the student (stillroom/char-1m) a short SFT start; then
distills the teacher into it on-policy. Prints a table of teacher,
student-before and student-after accuracy and writes metrics (JSONL) and a plot (PNG) next to it.
Everything goes through the SDK.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import stillroom
from stillroom_cookbook.distillation import DistillationConfig, distill
from stillroom_cookbook.evaluation import TaskEvaluator
from stillroom_cookbook.local_server import LocalServer
from stillroom_cookbook.metrics import MetricsLog, plot_curves
from stillroom_cookbook.renderers import CharRenderer
from stillroom_cookbook.supervised import SFTConfig, train_sft
from stillroom_cookbook.tasks import IteratedMapTask, Task


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    task: Task = IteratedMapTask(steps=6)
    teacher_model: str = "stillroom/char-10m"
    student_model: str = "stillroom/char-1m"
    # 400 steps, not the ~100 that reach 100% on correct chains: a teacher trained that briefly
    # writes a wrong next value after 17 of 40 corrupted prefixes (the student's own mistakes are
    # what it is asked to grade); after 400 steps it applies the map to all 40 (docs/cookbook.md).
    teacher_sft: SFTConfig = SFTConfig(steps=400, learning_rate=2e-3, batch_size=32, warmup_steps=10,
                                       name="teacher-sft")
    # The student's SFT accuracy jumps within a few tens of steps, at a point that moves with the
    # seed and data order (measured: 3-7% after 150 of 300 steps, 69-96% after 300), so its start
    # is "SFT until half the problems are right", checked every 25 steps.
    student_sft: SFTConfig = SFTConfig(steps=300, learning_rate=4e-3, batch_size=32, warmup_steps=10,
                                       eval_every=25, stop_at_accuracy=0.5, name="student-sft")
    # From the saved SFT start with a fresh optimizer. One sample per prompt over many prompts:
    # samples of one prompt share their first positions, which the exact loss scores identically.
    distillation: DistillationConfig = DistillationConfig(
        steps=60, learning_rate=1e-3, warmup_steps=10, max_tokens=25, groups_per_batch=128,
        group_size=1, loss="teacher_reverse_kl", eval_every=10)
    eval_problems: int = 100          # IteratedMapTask has 100 problems: each start once
    seed: int = 0


def get_teacher(service: stillroom.ServiceClient, config: DemoConfig, cache_dir: Path) -> tuple[str, int]:
    """The teacher's sampler path and parameter count: reused from <cache_dir>/teacher.json when the
    same config trained one before (and its checkpoint is still there), else trained now."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / "teacher.json"
    example = config.task.problems(1, seed=0)[0]   # so that a change of format retrains too
    key = {"model": config.teacher_model, "task": vars(config.task),
           "example": example.prompt + example.completion,
           "sft": dataclasses.asdict(config.teacher_sft), "seed": config.seed}
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        try:
            service.create_sampling_client(model_path=cached["sampler_path"])
            print(f"teacher: reusing {cached['sampler_path']} (--retrain-teacher to train it again)")
            return cached["sampler_path"], cached["num_params"]
        except stillroom.NotFoundError:
            pass
    trainer = service.create_full_training_client(config.teacher_model, seed=config.seed)
    renderer = CharRenderer(trainer.get_tokenizer())
    train_sft(trainer, renderer, worked_examples(config, config.teacher_sft), config.teacher_sft,
              MetricsLog(cache_dir / "teacher_sft.jsonl"))
    path = trainer.save_weights_for_sampler("teacher").result().path
    num_params = trainer.get_info().num_trainable_params
    cache.write_text(json.dumps({"key": key, "sampler_path": path, "num_params": num_params}, indent=2))
    return path, num_params


def worked_examples(config: DemoConfig, sft: SFTConfig) -> list[tuple[str, str]]:
    problems = config.task.problems(sft.steps * sft.batch_size, seed=config.seed * 1000 + 1)
    return [(p.prompt, p.completion) for p in problems]


def demo_evaluator(config: DemoConfig, renderer: CharRenderer) -> TaskEvaluator:
    problems = config.task.problems(config.eval_problems, seed=config.seed * 1000 + 2)
    return TaskEvaluator(renderer, config.task, problems, config.distillation.max_tokens)


def student_start(student: stillroom.TrainingClient, renderer: CharRenderer, config: DemoConfig,
                  evaluator: TaskEvaluator, out_dir: Path) -> str:
    """The student's short SFT on worked examples, saved as a training state; returns its path."""
    train_sft(student, renderer, worked_examples(config, config.student_sft), config.student_sft,
              MetricsLog(out_dir / "student_sft.jsonl"), evaluator)
    return student.save_state("student-start").result().path


def run_demo(service: stillroom.ServiceClient, config: DemoConfig, out_dir: Path,
             teacher_cache_dir: Path) -> dict[str, float]:
    """Teacher, student SFT start, distillation; returns the three accuracies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_path, _ = get_teacher(service, config, teacher_cache_dir)
    teacher = service.create_sampling_client(model_path=teacher_path)
    student = service.create_full_training_client(config.student_model, seed=config.seed)
    renderer = CharRenderer(student.get_tokenizer())
    evaluator = demo_evaluator(config, renderer)
    start_path = student_start(student, renderer, config, evaluator, out_dir)
    student = service.create_training_client_from_state(start_path)     # fresh optimizer
    log = MetricsLog(out_dir / "distillation.jsonl")
    prompts = [p.prompt for p in config.task.problems(4096, seed=config.seed * 1000 + 3)]
    distill(student, teacher, renderer, prompts, config.distillation, log, evaluator)
    curve = [(r["step"], r["eval/accuracy"]) for r in log.records if "eval/accuracy" in r]
    results = {"teacher": evaluator(teacher)["eval/accuracy"],
               "student before": curve[0][1], "student after": curve[-1][1]}
    plot_curves({"student (on-policy distillation)": curve}, out_dir / "distillation.png",
                title=f"{config.student_model} distilled from {config.teacher_model}",
                xlabel="distillation step", ylabel="accuracy (greedy)",
                hlines={"teacher": results["teacher"], "student before": results["student before"]})
    return results


def print_table(results: dict[str, float], n_problems: int) -> None:
    print(f"\n| model | greedy accuracy on {n_problems} problems |\n|---|---|")
    for name, accuracy in results.items():
        print(f"| {name} | {accuracy:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(".stillroom"))
    parser.add_argument("--retrain-teacher", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    parser.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                        help="let a request's samples depend on what shares its batch (faster decoding; "
                             "the table then varies from run to run)")
    args = parser.parse_args()
    config, out_dir = DemoConfig(), args.data_dir / "cookbook" / "distillation_demo"
    if args.retrain_teacher:
        (args.data_dir / "cookbook" / "teacher.json").unlink(missing_ok=True)
    start = time.monotonic()
    # one thread and batch-invariant sampling: the same table on every run on one machine (README)
    with LocalServer(args.data_dir, threads=args.threads, batch_invariant=args.batch_invariant) as server:
        print(f"server on {server.address} (log: {server.log_file}; {args.threads} torch thread"
              f"{'s' if args.threads > 1 else ''}, batch-invariant sampling "
              f"{'on' if args.batch_invariant else 'off'})")
        with stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as service:
            results = run_demo(service, config, out_dir, args.data_dir / "cookbook")
    print_table(results, config.eval_problems)
    print(f"\nmetrics and plot in {out_dir}/ ({time.monotonic() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
