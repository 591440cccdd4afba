"""The cookbook: task grading and advantages on hand-worked cases, renderers, and every loop run for
a couple of steps against a real server on the tiny preset."""

from __future__ import annotations

import copy
import math
import random
from typing import Literal

import pytest

from stillroom_cookbook.distillation import DistillationConfig, distill, reverse_kl_advantages
from stillroom_cookbook.evaluation import TaskEvaluator, evaluate
from stillroom_cookbook.metrics import MetricsLog, plot_curves, read_jsonl
from stillroom_cookbook.renderers import CharRenderer, ChatRenderer
from stillroom_cookbook.rl import RLConfig, group_advantages, train_rl
from stillroom_cookbook.schedules import cycle_batches, linear_lr
from stillroom_cookbook.supervised import SFTConfig, sft_datum, train_sft
from stillroom_cookbook.tasks import (
    AdditionTask,
    IteratedMapTask,
    RunningSumTask,
    grade_answer,
    worked_addition,
    worked_running_sum,
)

TINY = "stillroom/char-1m"
TASK = RunningSumTask(min_terms=2, max_terms=4, base=5)


# ---------------------------------------------------------------- tasks, advantages, schedules


def test_iterated_map_writes_every_value_of_the_chain():
    task = IteratedMapTask(steps=4)
    problem = task.problem(47)
    assert task.values(47) == [42, 27, 82, 47]          # 3*47+1 = 142, 3*42+1 = 127, ...
    assert (problem.prompt, problem.completion, problem.answer) == ("47:", "42 27 82 47 >47", 47)
    assert task.grade(problem, problem.completion) and not task.grade(problem, "42 27 82 47 >46")
    assert len(problem.completion) + 1 <= task.max_completion_chars   # room for eos
    assert IteratedMapTask(steps=6).problems(20, seed=1) == IteratedMapTask(steps=6).problems(20, seed=1)
    # only 100 problems exist: any 100 in a row hold each start once
    starts = [p.prompt for p in task.problems(250, seed=2)]
    assert len(set(starts[:100])) == len(set(starts[100:200])) == 100 == len(set(starts))
    with pytest.raises(ValueError):
        IteratedMapTask(steps=0)


def test_worked_running_sum_writes_the_total_after_every_term():
    assert worked_running_sum([8, 3, 5, 1], base=10) == "8, 1, 6, 7 >7"
    assert worked_running_sum([3, 4, 1], base=5) == "3, 2, 3 >3"
    problems = RunningSumTask(6, 10, base=5).problems(50, seed=3)
    assert problems == RunningSumTask(6, 10, base=5).problems(50, seed=3)
    for p in problems:
        terms = [int(t) for t in p.prompt.removesuffix("=").split(", ")]
        assert 6 <= len(terms) <= 10 and all(0 <= t < 5 for t in terms)
        assert p.answer == sum(terms) % 5 and RunningSumTask().grade(p, p.completion)
        # each step is as wide as a term in the prompt: three characters
        assert len(p.completion.split(" >")[0]) == len(p.prompt) - 1
    with pytest.raises(ValueError):
        RunningSumTask(base=11)


def test_worked_addition_writes_every_column_with_its_carry():
    assert worked_addition(347, 85) == "7+5+0=12 4+8+1=13 3+0+1=04 >432"
    assert worked_addition(99, 1) == "9+1+0=10 9+0+1=10 >100"
    assert worked_addition(5, 3) == "5+3+0=08 >8"
    assert worked_addition(5, 3, width=2) == "5+3+0=08 0+0+0=00 >8"


def test_grader_reads_the_number_after_the_last_marker():
    assert grade_answer("7+5+0=12 4+8+1=13 3+0+1=04 >432", 432)
    assert grade_answer("anything at all >432  \n", 432)
    assert grade_answer(">12 >432", 432)
    assert not grade_answer("7+5+0=12 4+8+1=13 3+0+1=04 >431", 432)
    assert not grade_answer("432", 432)                 # no marker
    assert not grade_answer(">432 and more", 432)       # the answer must end the completion
    assert not grade_answer("", 432)


def test_addition_problems_are_reproducible_and_graded_correct_by_their_own_answer():
    problems = AdditionTask(2, 3).problems(50, seed=7)
    assert problems == AdditionTask(2, 3).problems(50, seed=7)
    for p in problems:
        a, b = p.prompt.removesuffix("=").split("+")
        assert len(a) == len(b) == 3                      # zero-padded to max_digits
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999 and p.answer == int(a) + int(b)
        assert AdditionTask().grade(p, p.completion)
    with pytest.raises(ValueError):
        AdditionTask(min_digits=3, max_digits=2)


def test_group_advantages_are_centred_within_the_group():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([1.0, 1.0]) == [0.0, 0.0]


def test_reverse_kl_advantages_reward_tokens_the_teacher_likes_more():
    # student logprob - teacher logprob: 0.5 (student overconfident) and -0.75 (teacher likes it more)
    assert reverse_kl_advantages([-0.5, -1.0], [-1.0, -0.25], kl_coef=1.0) == [-0.5, 0.75]
    assert reverse_kl_advantages([-0.5, -1.0], [-1.0, -0.25], kl_coef=2.0) == [-1.0, 1.5]
    assert reverse_kl_advantages([-0.3], [-0.3], kl_coef=1.0) == [0.0]
    with pytest.raises(ValueError):
        reverse_kl_advantages([-0.3, -0.1], [-0.3], kl_coef=1.0)


def test_batches_cover_every_item_each_pass_and_lr_warms_up_then_decays():
    batches = cycle_batches(list(range(10)), 5, seed=0)
    assert sorted(next(batches) + next(batches)) == list(range(10))
    with pytest.raises(ValueError):
        next(cycle_batches([1, 2], 3, seed=0))
    lrs = [linear_lr(1.0, s, 10, warmup_steps=2, final_fraction=0.1) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.1


# ---------------------------------------------------------------- renderers


def test_char_renderer_adds_bos_to_the_prompt_and_eos_to_the_completion(tokenizer):
    renderer = CharRenderer(tokenizer)
    prompt, completion = renderer.prompt_tokens("12+3="), renderer.completion_tokens("12+3=", ">15")
    assert prompt[0] == tokenizer.bos_token_id and renderer.decode(prompt[1:]) == "12+3="
    assert completion[-1] == tokenizer.eos_token_id and renderer.decode(completion) == ">15"
    assert renderer.stop_tokens == [tokenizer.eos_token_id]
    datum = sft_datum(renderer, "12+3=", ">15")
    weights = datum.loss_fn_inputs["weights"].data
    # targets: the 5 prompt characters after bos carry no loss; the 3 answer characters and eos do
    assert weights == [0.0] * 5 + [1.0] * 4
    assert datum.loss_fn_inputs["target_tokens"].data == (prompt + completion)[1:]


def test_chat_renderer_uses_the_template_and_stops_at_the_end_of_turn(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    renderer = ChatRenderer(chat, system="be brief")
    prompt = renderer.prompt_tokens("1+1=")
    assert chat.decode(prompt) == "system:be brief<eos>\nuser:1+1=<eos>\nassistant:"
    completion = renderer.completion_tokens("1+1=", ">2")
    assert completion == [*chat.encode(">2"), chat.eos_token_id]   # the trailing newline is cut
    assert renderer.stop_tokens == [chat.eos_token_id]
    with pytest.raises(ValueError, match="chat_template"):
        ChatRenderer(tokenizer)


# ---------------------------------------------------------------- metrics


def test_metrics_go_to_jsonl_and_curves_to_png(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.log(0, loss=2.0)
    log.log(1, loss=1.0, accuracy=0.5)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["loss"] for r in records] == [2.0, 1.0] and log.last("accuracy") == 0.5
    png = plot_curves({"a": [(0, 0.1), (1, 0.4)]}, tmp_path / "plot.png", title="t", xlabel="x",
                      ylabel="y", hlines={"teacher": 0.5})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- loops against the server


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return CharRenderer(tokenizer)


@pytest.fixture(scope="module")
def evaluator(renderer):
    return TaskEvaluator(renderer, TASK, TASK.problems(4, seed=1), max_tokens=16)


def test_sft_lowers_the_loss_and_logs_evaluations(service, renderer, evaluator, tmp_path):
    trainer = service.create_full_training_client(TINY, seed=0)
    examples = [(p.prompt, p.completion) for p in TASK.problems(16, seed=0)]
    log = MetricsLog(tmp_path / "sft.jsonl")
    train_sft(trainer, renderer, examples, SFTConfig(steps=6, learning_rate=3e-3, batch_size=8,
                                                     eval_every=3), log, evaluator, progress=False)
    losses = [r["loss"] for r in log.records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in log.records if "eval/accuracy" in r] == [0, 3, 6]
    assert len(read_jsonl(tmp_path / "sft.jsonl")) == len(log.records)


def test_sft_stops_at_the_first_evaluation_that_reaches_the_target(service, renderer, evaluator, capsys):
    trainer = service.create_full_training_client(TINY, seed=0)
    examples = [(p.prompt, p.completion) for p in TASK.problems(16, seed=0)]
    config = SFTConfig(steps=6, learning_rate=3e-3, batch_size=4, eval_every=2, stop_at_accuracy=0.0,
                       name="sft")
    log = train_sft(trainer, renderer, examples, config, MetricsLog(None), evaluator)
    assert [r["step"] for r in log.records if "eval/accuracy" in r] == [0, 2]
    assert len([r for r in log.records if "loss" in r]) == 2
    # the progress bar ends on the step it stopped after and says why it stopped short of 6
    final = capsys.readouterr().err.split("\r")[-1]
    assert "sft: 0% right after step 2, target 0% reached, stopped" in final and "2/6" in final, final


def test_evaluation_grades_greedy_completions(service, renderer):
    sampler = service.create_sampling_client(base_model=TINY)
    problems = TASK.problems(3, seed=2)
    result = evaluate(sampler, renderer, TASK, problems, max_tokens=8)
    assert len(result.completions) == 3 and 1 <= result.mean_length <= 8
    assert result.accuracy == sum(TASK.grade(p, c) for p, c in zip(problems, result.completions)) / 3
    again = evaluate(sampler, renderer, TASK, problems, max_tokens=8)
    assert again.completions == result.completions   # greedy


def test_rl_trains_only_on_groups_with_a_reward_signal(service, renderer, tmp_path):
    trainer = service.create_full_training_client(TINY, seed=0)
    problems = TASK.problems(8, seed=3)
    rng = random.Random(0)
    log = train_rl(trainer, renderer, problems, lambda p, text: float(rng.random() < 0.5),
                   RLConfig(steps=2, learning_rate=1e-3, max_tokens=8, groups_per_batch=2,
                            group_size=4), MetricsLog(tmp_path / "rl.jsonl"), progress=False)
    steps = [r for r in log.records if "reward" in r]
    assert len(steps) == 2 and all(0 <= r["reward"] <= 1 for r in steps)
    assert all(r["trained_sequences"] <= 8 and r["sampled_tokens"] > 0 for r in steps)


def test_distilling_from_an_identical_teacher_sees_no_kl(service, renderer, evaluator, tmp_path):
    # The student starts as the teacher's exact weights, so the sampled reverse-KL estimate is 0
    # at the first step; after an update it moves away from 0.
    trainer = service.create_full_training_client(TINY, seed=0)
    teacher = service.create_sampling_client(base_model=TINY)
    prompts = [p.prompt for p in TASK.problems(8, seed=4)]
    log = distill(trainer, teacher, renderer, prompts,
                  DistillationConfig(steps=2, learning_rate=1e-2, max_tokens=8, groups_per_batch=2,
                                     group_size=2), MetricsLog(tmp_path / "distill.jsonl"),
                  evaluator, progress=False)
    kls = [r["teacher_kl"] for r in log.records if "teacher_kl" in r]
    # the first step's student is the teacher: the sampled estimate averages logprob differences of a
    # few ulps (~1e-6), far below 1e-3
    assert len(kls) == 2 and abs(kls[0]) < 1e-3 and math.isfinite(kls[1]) and kls[1] != kls[0]
    assert [r["step"] for r in log.records if "eval/accuracy" in r] == [0, 2]


def test_distillation_with_the_server_side_teacher_loss(service, renderer, tmp_path):
    if "teacher_reverse_kl" not in service.get_server_capabilities().loss_fns:
        pytest.skip("the server does not offer teacher_reverse_kl")
    trainer = service.create_full_training_client(TINY, seed=0)
    teacher_trainer = service.create_full_training_client(TINY, seed=0)
    teacher = teacher_trainer.save_weights_and_get_sampling_client("identical-teacher")
    prompts = [p.prompt for p in TASK.problems(8, seed=5)]
    log = distill(trainer, teacher, renderer, prompts,
                  DistillationConfig(steps=2, learning_rate=1e-2, max_tokens=8, groups_per_batch=2,
                                     group_size=2, loss="teacher_reverse_kl"),
                  MetricsLog(tmp_path / "distill-exact.jsonl"), progress=False)
    kls = [r["teacher_kl"] for r in log.records if "teacher_kl" in r]
    # the exact reverse KL of identical models is 0, and never negative (but for rounding: sums of p log p
    # over the vocabulary, ~u H = 5e-7 a token)
    assert len(kls) == 2 and abs(kls[0]) < 1e-4 and kls[1] >= -1e-6


# ---------------------------------------------------------------- the demo and the comparison, tiny


def tiny_demo_config():
    from stillroom_cookbook.recipes.distillation_demo import DemoConfig

    return DemoConfig(task=TASK, teacher_model=TINY, student_model=TINY,
                      teacher_sft=SFTConfig(steps=2, learning_rate=3e-3, batch_size=4, name="teacher-sft"),
                      student_sft=SFTConfig(steps=1, learning_rate=3e-3, batch_size=4, name="student-sft"),
                      distillation=DistillationConfig(steps=2, learning_rate=1e-3, max_tokens=16,
                                                      groups_per_batch=2, group_size=2, eval_every=1),
                      eval_problems=4)


@pytest.mark.slow
def test_demo_trains_caches_and_reuses_its_teacher(service, tmp_path, capsys):
    from stillroom_cookbook.recipes.distillation_demo import run_demo

    config = tiny_demo_config()
    results = run_demo(service, config, tmp_path / "demo", tmp_path)
    assert set(results) == {"teacher", "student before", "student after"}
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert (tmp_path / "demo" / "distillation.png").exists()
    evals = [r for r in read_jsonl(tmp_path / "demo" / "distillation.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    cached = (tmp_path / "teacher.json").read_text()
    run_demo(service, config, tmp_path / "demo", tmp_path)
    assert "teacher: reusing" in capsys.readouterr().out
    assert (tmp_path / "teacher.json").read_text() == cached


@pytest.mark.slow
def test_comparison_writes_a_table_and_plots(service, tmp_path):
    import dataclasses

    from stillroom_cookbook.recipes.comparison import METHODS, ComparisonConfig, run_comparison

    config = ComparisonConfig(demo=tiny_demo_config(), steps=2, eval_every=1, seeds=(0, 1))
    table = run_comparison(service, config, tmp_path / "runs", tmp_path, tmp_path / "docs",
                           "python scripts/compare_distillation.py --steps 2")
    report = (tmp_path / "docs" / "distillation_comparison.md").read_text()
    assert table in report and "--steps 2" in report
    offered = "teacher_reverse_kl" in service.get_server_capabilities().loss_fns
    for method, label in METHODS.items():
        assert (f"| {label} |" in table) == (method != "distill_exact" or offered)
    for kind in ("steps", "flops"):
        assert (tmp_path / "docs" / f"distillation_comparison_{kind}.png").exists()
    with pytest.raises(ValueError):
        dataclasses.replace(config, methods=("nope",))


def test_distillation_config_refuses_a_temperature_its_loss_cannot_use():
    """The sampled estimate's advantage is the student's own logprob of a temperature-1 draw; the
    exact loss only picks positions, so it may sample colder."""
    def config(loss: Literal["sampled", "teacher_reverse_kl"], temperature: float) -> DistillationConfig:
        return DistillationConfig(steps=1, learning_rate=1e-3, max_tokens=8, loss=loss,
                                  temperature=temperature)

    assert config("teacher_reverse_kl", 0.7).temperature == 0.7
    with pytest.raises(ValueError, match="DistillationConfig.temperature"):
        config("sampled", 0.7)
    with pytest.raises(ValueError, match="DistillationConfig.temperature"):
        config("teacher_reverse_kl", 0.0)
