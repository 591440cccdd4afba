"""Personalization, the on-policy distillation post's second experiment, on SmolLM2-135M-Instruct:
mid-train the assistant on internal documents (it learns their facts and loses some instruction
following), then distill its own earlier self back in on instruction prompts.

    bash scripts/setup_real_model.sh
    python -m stillroom_cookbook.recipes.personalization [--smoke] [--seeds 0 1 2] [--out docs]
        [--plain-midtrain] [--no-replay-control] [--pure-distill] [--merged-distill]
        [--chat-questions] [--sampled-eval]

Starts a server per worker (STILLROOM_DTYPE=bf16-train and one torch thread unless set: training in
bf16, sampling and scoring in fp32, so that a greedy reply does not depend on its batch), scores the
base model once, and per seed: mid-trains a LoRA run on the documents with the teacher's chat
replies mixed in (the post's mid-training); from that state, distills with Tinker's sampled-token
estimate and with Stillroom's exact `teacher_reverse_kl`, each step also replaying a few
mid-training documents (`replay_documents`; not the post's recipe), and fine-tunes on the teacher's
samples (SFT); and, as a control, trains the same state on the replayed documents alone for the
exact loss's steps (no distillation; --no-replay-control leaves it out). Optional rows:
--plain-midtrain, a mid-training on the documents alone; --pure-distill, the exact loss without
the replay; --merged-distill, the start folded into the base's weights and distilled into a fresh
LoRA on them. Optional scores (each about as dear as the greedy instruction replies):
--chat-questions, the facts as a multiple-choice chat reply; --sampled-eval, the instruction score
at temperature 1. Writes personalization.json, personalization_table.md and personalization.png
under --out; stopping it (Ctrl-C, SIGTERM) stops its workers and their servers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import stillroom
from stillroom import types
from stillroom_cookbook import instruction_following as ifeval
from stillroom_cookbook.distillation import DistillationConfig, distill
from stillroom_cookbook.local_server import LocalServer
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.recipes.personalization import data as corpus
from stillroom_cookbook.recipes.personalization.evaluation import Scores, score
from stillroom_cookbook.recipes.personalization.report import METHODS, write_report
from stillroom_cookbook.renderers import ChatRenderer
from stillroom_cookbook.rollouts import completion_datum
from stillroom_cookbook.schedules import cycle_batches
from stillroom_cookbook.supervised import SFTConfig, train_sft

MODEL_NAME = "smollm2-135m-instruct"
METHOD_ORDER = {m: i for i, m in enumerate(METHODS)}


@dataclasses.dataclass(frozen=True)
class PersonalizationConfig:
    model_dir: Path
    num_people: int = 12              # three facts each (the generator makes up to 30)
    teach_qa: bool = False            # mix question-answer pairs about the first half of the people into
                                      # mid-training, and score only the other half
    phrasings_per_fact: int = 4       # of the four document phrasings
    eval_topics: int = 12             # instruction topics kept for evaluation (8 constraints each: 96
                                      # prompts; the other 24 topics' 192 are for training)
    teacher_prompts: int = 48         # training instruction prompts the teacher answers (SFT, chat mix)
    teacher_reply_tokens: int = 32    # the most tokens of each of those replies
    lora_rank: int = 32
    # Sized to the 2-core CPU (docs/personalization.md has the measured speeds).
    midtrain: SFTConfig = SFTConfig(steps=32, learning_rate=3e-3, batch_size=12, final_lr_fraction=0.3,
                                    name="mid-train")
    chat_fraction: float = 0.3        # of the mid-training examples, in the chat-mix variant
    distill_start: str = "mid-train + chat mix"   # the mid-training that distillation and SFT start from
                                      # (their runs resume its LoRA adapter)
    plain_midtrain: bool = False      # also mid-train on the documents alone (a row for contrast)
    merged_distill: bool = False      # also: fold the start's adapter into the base model's weights and
                                      # distill (exact reverse KL) into a fresh LoRA on the merged model
                                      # (off in the 3-seed run for its budget; the probes in the docs ran it)
    # the exact loss's student samples at temperature 0.7, so that its training positions include the
    # near-greedy paths the greedy evaluation takes (the sampled estimate samples at 1, as it must)
    distill: DistillationConfig = DistillationConfig(steps=32, learning_rate=1e-3, max_tokens=40,
                                                     groups_per_batch=8, group_size=1,
                                                     loss="teacher_reverse_kl", temperature=0.7)
    sampled_steps: int | None = 16    # the sampled estimate's steps (None: distill.steps): half the exact
                                      # loss's, for the budget (its KL stalls by step 16 in every round)
    replay_documents: int = 4         # mid-training documents replayed (cross-entropy) in each distillation
                                      # step, their gradient added to the same update: replay, not the post's
    replay_weight: float = 1.0        # the replayed documents' per-token weight in that update
    pure_distill_row: bool = False    # with replay: also distill (exact reverse KL) without it, for contrast
                                      # (off in the 3-seed run for its budget)
    replay_control: bool = True       # also: the replayed documents alone, the exact loss's steps and
                                      # learning rate, no distillation (what replay re-trains by itself;
                                      # with replay_documents > 0)
    chat_questions: bool = False      # also score the facts as a multiple-choice chat reply (at chance
                                      # in every round so far; the cloze probe is the knowledge score)
    sampled_eval: bool = False        # also score instruction following at temperature 1
    sft: SFTConfig = SFTConfig(steps=8, learning_rate=1e-3, batch_size=6, name="sft-teacher")
    instruction_tokens: int = 40
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"model_dir: {self.model_dir} holds no config.json; run "
                             "bash scripts/setup_real_model.sh (stillroom models import) first")
        if self.distill_start == "mid-train" and not self.plain_midtrain:
            raise ValueError("distill_start: 'mid-train' needs plain_midtrain")
        if self.distill_start not in ("mid-train", "mid-train + chat mix"):
            raise ValueError(f"distill_start: 'mid-train' or 'mid-train + chat mix', "
                             f"got {self.distill_start!r}")
        if not 0 <= self.chat_fraction < 1:
            raise ValueError(f"chat_fraction: in [0, 1), got {self.chat_fraction}")
        if self.sampled_steps is not None and self.sampled_steps < 0:
            raise ValueError(f"sampled_steps: >= 0 or None, got {self.sampled_steps}")
        if self.replay_documents < 0 or self.replay_weight <= 0:
            raise ValueError(f"replay_documents: >= 0 and replay_weight: > 0, got {self.replay_documents} "
                             f"and {self.replay_weight}")


def smoke(config: PersonalizationConfig) -> PersonalizationConfig:
    """A few steps of every stage on a sliver of the data: what CI runs. Sized to a busy 2-core CPU: the
    nine rows' scores are most of its time (choice and cloze logprobs most of each: 10 candidates a
    question), hence one person's three facts and 8-token replies."""
    tiny = dict(steps=2, batch_size=2)
    return dataclasses.replace(
        config, num_people=1, eval_topics=1, teacher_prompts=4, instruction_tokens=8,
        midtrain=dataclasses.replace(config.midtrain, **tiny), sft=dataclasses.replace(config.sft, **tiny),
        distill=dataclasses.replace(config.distill, steps=2, groups_per_batch=2, max_tokens=8),
        sampled_steps=1, seeds=config.seeds[:1], merged_distill=True, replay_documents=2,
        pure_distill_row=True, replay_control=True, plain_midtrain=True, chat_questions=True,
        sampled_eval=True, teacher_reply_tokens=8)


def cpu_seconds(server_pid: int | None) -> float:
    """CPU seconds used so far by this process and (from /proc, where it is readable) the server's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    stat = Path(f"/proc/{server_pid}/stat")
    if server_pid is not None and stat.exists():
        fields = stat.read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclasses.dataclass
class Stage:
    method: str
    seed: int
    scores: Scores
    train_tokens: int = 0       # tokens through forward_backward
    sampled_tokens: int = 0     # tokens generated for training (not evaluation)
    teacher_tokens: int = 0     # tokens the teacher scored
    steps: int = 0              # optimizer steps beyond its start
    seconds: float = 0.0        # wall time, evaluation included
    cpu_seconds: float = 0.0    # the client's and the server's CPU time, evaluation included
    load: float = 0.0           # the machine's 1-minute load average when the stage ended
    start: str | None = None    # the method whose weights this stage started from (its seed's row)
    note: dict = dataclasses.field(default_factory=dict)   # stage-specific measurements

    def row(self) -> dict:
        return {"method": self.method, "seed": self.seed, "questions": self.scores.questions,
                "answer_probability": self.scores.answer_probability, "cloze": self.scores.cloze,
                "cloze_probability": self.scores.cloze_probability,
                "instructions": self.scores.instructions,
                "instruction_kinds": self.scores.instruction_kinds, "looping": self.scores.looping,
                "instructions_sampled": self.scores.instructions_sampled,
                "steps": self.steps, "train_tokens": self.train_tokens,
                "sampled_tokens": self.sampled_tokens, "teacher_tokens": self.teacher_tokens,
                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "load": round(self.load, 2), "start": self.start, **self.note,
                "examples": list(self.scores.examples)}


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the stages after a mid-training begin: its saved LoRA state (the adapter trains on) or,
    with `merged` set, a model folder holding the adapter folded into the base (a fresh LoRA on top)."""
    method: str                          # the mid-training's method name
    state: str                           # its saved state (stillroom://...)
    sampler: stillroom.SamplingClient    # its sampler weights
    merged: str | None = None            # absolute path of the merged model folder


class Experiment:
    """The data, the server's clients and the stages of one run of the experiment."""

    def __init__(self, service: stillroom.ServiceClient, config: PersonalizationConfig, log_dir: Path,
                 server_pid: int | None = None):
        self.service, self.config, self.log_dir = service, config, log_dir
        self.server_pid = server_pid
        self.base_model = str(config.model_dir)
        self.teacher = service.create_sampling_client(base_model=self.base_model)
        self.renderer = ChatRenderer(self.teacher.get_tokenizer())
        facts = corpus.make_facts(config.num_people)
        self.documents = corpus.documents(facts, config.phrasings_per_fact)
        taught, held_out = corpus.taught(facts) if config.teach_qa else ([], facts)
        self.qa_pairs = corpus.qa_pairs(taught)
        self.questions = corpus.questions(held_out)
        self.documents_renderer = DocumentOrChatRenderer(self.renderer)
        train, evaluation = ifeval.split(config.eval_topics)
        random.Random(1).shuffle(train)
        self.train_prompts = [i.prompt for i in train]
        self.eval_instructions = evaluation

    def score(self, sampler: stillroom.SamplingClient) -> Scores:
        c = self.config
        return score(sampler, self.renderer, self.questions, self.eval_instructions, c.instruction_tokens,
                     self.renderer.tokenizer, self.documents_renderer.end_of_text,
                     chat_questions=c.chat_questions, sampled=c.sampled_eval)

    def timed(self, stage: Stage, start: float, cpu_start: float) -> Stage:
        """`stage` with its wall time, CPU time and the load average filled in."""
        stage.seconds = time.monotonic() - start
        stage.cpu_seconds = cpu_seconds(self.server_pid) - cpu_start
        stage.load = os.getloadavg()[0]
        return stage

    def teacher_replies(self, seed: int) -> list[tuple[str, str]]:
        """The base model's replies (temperature 1) to the training instruction prompts."""
        params = types.SamplingParams(max_tokens=self.config.teacher_reply_tokens, temperature=1.0,
                                      seed=seed, stop=self.renderer.stop_tokens)
        futures = [self.teacher.sample(types.ModelInput.from_ints(self.renderer.prompt_tokens(p)), 1, params)
                   for p in self.train_prompts[:self.config.teacher_prompts]]
        return [(p, self.renderer.decode(f.result().sequences[0].tokens))
                for p, f in zip(self.train_prompts, futures)]

    def release(self, trainer: stillroom.TrainingClient) -> None:
        """Free a finished stage's run on the server (its checkpoints stay)."""
        trainer.unload()

    def midtrain(self, seed: int, chat: list[tuple[str, str]] | None = None) -> tuple[Start, Stage]:
        """Mid-train a fresh LoRA run on the documents (and chat replies); its saved state and scores."""
        c = self.config
        method = "mid-train + chat mix" if chat else "mid-train"
        slug = "mid-train-chat" if chat else "mid-train"
        trainer = self.service.create_lora_training_client(self.base_model, rank=c.lora_rank, seed=seed)
        examples = [("", doc) for doc in self.documents] + self.qa_pairs
        if chat:
            wanted = int(len(examples) * c.chat_fraction / (1 - c.chat_fraction))
            examples += [chat[i % len(chat)] for i in range(wanted)]
        renderer = DocumentOrChatRenderer(self.renderer)
        start, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        log = MetricsLog(self.log_dir / f"{slug}-{seed}.jsonl")
        train_sft(trainer, renderer, examples, dataclasses.replace(c.midtrain, seed=seed,
                                                                  name=f"{slug}-s{seed}"), log)
        state = trainer.save_state(f"{slug}-{seed}").result().path
        sampler = trainer.save_weights_and_get_sampling_client(f"{slug}-{seed}")
        trainer.unload()
        stage = Stage(method, seed, self.score(sampler), start="base model", steps=c.midtrain.steps,
                      train_tokens=sum(r.get("train_tokens", 0) for r in log.records),
                      sampled_tokens=sum(len(renderer.tokens(p, t)) for p, t in (chat or [])))
        return Start(method, state, sampler), self.timed(stage, start, cpu)

    def merge(self, start: Start, stage: Stage) -> Start:
        """`start` with its adapter folded into the base model's weights: a model folder the server
        loads as a new base (by its absolute path). Its time goes to `stage` (the mid-training's row),
        with the per-token logprob gap between the adapter and the merged model on a document."""
        from stillroom.export import merge_lora_adapter

        began, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        slug = start.method.replace(" + ", "-").replace(" ", "-")
        out = (self.log_dir.parent / "merged" / f"{slug}-{stage.seed}").resolve()
        with tempfile.TemporaryDirectory(dir=self.log_dir.parent) as staging:
            folder = self.service.create_rest_client().download_checkpoint_archive(
                start.sampler.model_path or "", staging, progress=False)
            merge_lora_adapter(folder, out, self.config.model_dir)
        merged = self.service.create_sampling_client(base_model=str(out))
        tokens = types.ModelInput.from_ints(self.documents_renderer.tokens("", self.documents[0]))
        adapter_lp, merged_lp = start.sampler.compute_logprobs(tokens), merged.compute_logprobs(tokens)
        gaps = [abs(a - b) for a, b in zip(adapter_lp.result(), merged_lp.result())
                if a is not None and b is not None]
        stage.seconds += time.monotonic() - began
        stage.cpu_seconds += cpu_seconds(self.server_pid) - cpu
        stage.note.update(merge_seconds=round(time.monotonic() - began, 1),
                         merged_logprob_gap_mean=round(sum(gaps) / len(gaps), 4),
                         merged_logprob_gap_max=round(max(gaps), 4))
        print(f"merged {start.method} (seed {stage.seed}) into {out}: {time.monotonic() - began:.0f} s, "
              f"logprob gap to the adapter on a document {sum(gaps) / len(gaps):.4f} mean, "
              f"{max(gaps):.4f} max", flush=True)
        return dataclasses.replace(start, merged=str(out))

    def student(self, start: Start, seed: int) -> stillroom.TrainingClient:
        """A training run from `start`: a fresh LoRA on its merged weights, or its adapter resumed."""
        if start.merged:
            return self.service.create_lora_training_client(start.merged, rank=self.config.lora_rank,
                                                            seed=seed)
        return self.service.create_training_client_from_state(start.state)

    def distill_from(self, start: Start, seed: int, loss: str, config: DistillationConfig | None = None,
                     replay: int | None = None, method: str | None = None) -> Stage:
        """On-policy distillation from `start` with `loss` (the config's settings unless `config` is
        given), replaying `replay` mid-training documents a step (the config's `replay_documents`)."""
        c = self.config
        exact = loss == "teacher_reverse_kl"
        replay = c.replay_documents if replay is None else replay
        method = method or ("distill (exact reverse KL)" if exact else "distill (sampled estimate)")
        slug = f"{loss}-replay" if replay else loss
        method = f"{method} + replay" if replay else method
        slug = f"{slug}-merged" if start.merged else slug
        if start.merged:
            method = f"{method}, merged"
        trainer = self.student(start, seed)
        began, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        log = MetricsLog(self.log_dir / f"distill-{slug}-{seed}.jsonl")
        # the sampled estimate's advantage is the student's own logprob of a draw: temperature 1 there
        config = config or c.distill
        steps = config.steps if exact or c.sampled_steps is None else c.sampled_steps
        config = dataclasses.replace(config, loss=loss, seed=seed, name=f"distill-{slug}-s{seed}",
                                     temperature=config.temperature if exact else 1.0, steps=steps)
        replayed: list = []
        hook = self.replayer(trainer, seed, replay, replayed) if replay else None
        distill(trainer, self.teacher, self.renderer, self.train_prompts, config, log, before_optim=hook)
        sampler = trainer.save_weights_and_get_sampling_client(f"{slug}-{seed}")
        replay_tokens = sum(n for n, _, _ in replayed)
        stage = Stage(method, seed, self.score(sampler), start=start.method, steps=steps,
                      train_tokens=sum(r.get("train_tokens", 0) for r in log.records) + replay_tokens,
                      sampled_tokens=sum(r.get("sampled_tokens", 0) for r in log.records),
                      teacher_tokens=sum(r.get("teacher_tokens", 0) for r in log.records))
        if replayed:
            losses = [f.result().metrics["loss:sum"] / w for _, w, f in replayed]
            stage.note.update(replay_documents=replay, replay_weight=c.replay_weight,
                              replay_loss_first=round(losses[0], 4), replay_loss_last=round(losses[-1], 4))
        self.release(trainer)
        return self.timed(stage, began, cpu)

    def replayer(self, trainer: stillroom.TrainingClient, seed: int, count: int,
                 sent: list) -> Callable[[int], None]:
        """A `distill` hook that sends `count` mid-training documents (cross-entropy, weight
        `replay_weight` a token) into the step's update; appends (tokens, weight sum, future) to `sent`."""
        batches = cycle_batches(self.documents, count, seed)
        weight = self.config.replay_weight

        def replay(step: int) -> None:
            render = self.documents_renderer
            data = [completion_datum(render.prompt_tokens(""), render.completion_tokens("", doc), weight)
                    for doc in next(batches)]
            sent.append((sum(d.model_input.length for d in data),
                         sum(sum(d.loss_fn_inputs["weights"].data) for d in data),
                         trainer.forward_backward(data, "cross_entropy")))
        return replay

    def replay_only(self, start: Start, seed: int) -> Stage:
        """The control for replay: from `start`, the documents the exact loss's run replays (the same
        batches, in the same order) with its steps and learning rate, and no distillation loss. Adam
        scales an update by its own gradient, so these steps are larger than replay's share of a
        distillation step: an upper bound on what replay re-trains by itself."""
        c = self.config
        trainer = self.student(start, seed)
        began, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        log = MetricsLog(self.log_dir / f"replay-only-{seed}.jsonl")
        sft = SFTConfig(steps=c.distill.steps, learning_rate=c.distill.learning_rate,
                        batch_size=c.replay_documents, final_lr_fraction=c.distill.final_lr_fraction,
                        seed=seed, name=f"replay-only-s{seed}")
        train_sft(trainer, self.documents_renderer, [("", doc) for doc in self.documents], sft, log)
        sampler = trainer.save_weights_and_get_sampling_client(f"replay-only-{seed}")
        stage = Stage("replay only (control)", seed, self.score(sampler), start=start.method, steps=sft.steps,
                      train_tokens=sum(r.get("train_tokens", 0) for r in log.records))
        self.release(trainer)
        return self.timed(stage, began, cpu)

    def sft_from(self, start: Start, seed: int, replies: list[tuple[str, str]]) -> Stage:
        c = self.config
        trainer = self.student(start, seed)
        began, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        log = MetricsLog(self.log_dir / f"sft-teacher-{seed}.jsonl")
        train_sft(trainer, self.renderer, replies,
                  dataclasses.replace(c.sft, seed=seed, name=f"sft-teacher-s{seed}"), log)
        sampler = trainer.save_weights_and_get_sampling_client(f"sft-{seed}")
        stage = Stage("SFT on teacher samples", seed, self.score(sampler), start=start.method,
                      steps=c.sft.steps,
                      train_tokens=sum(r.get("train_tokens", 0) for r in log.records),
                      sampled_tokens=sum(len(self.renderer.completion_tokens(p, t)) for p, t in replies))
        self.release(trainer)
        return self.timed(stage, began, cpu)

    def run(self, on_seed=lambda stages: None, with_base: bool = True) -> list[Stage]:
        """Every stage of every seed; `on_seed(stages so far)` after each seed."""
        c = self.config
        start, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        stages: list[Stage] = []
        if with_base:
            self._report(stages, self.timed(Stage("base model", -1, self.score(self.teacher)), start, cpu))
        for seed in c.seeds:
            replies = self.teacher_replies(seed)
            plain = None
            if c.plain_midtrain:
                plain, plain_stage = self.midtrain(seed)
                self._report(stages, plain_stage)
            mixed, mixed_stage = self.midtrain(seed, chat=replies)
            origin, origin_stage = mixed, mixed_stage
            if c.distill_start == "mid-train" and plain is not None:
                origin, origin_stage = plain, plain_stage
            merged = self.merge(origin, origin_stage) if c.merged_distill else None
            self._report(stages, mixed_stage)
            self._report(stages, self.distill_from(origin, seed, "sampled"))
            self._report(stages, self.distill_from(origin, seed, "teacher_reverse_kl"))
            if c.replay_documents and c.pure_distill_row:
                self._report(stages, self.distill_from(origin, seed, "teacher_reverse_kl", replay=0))
            if c.replay_control and c.replay_documents:
                self._report(stages, self.replay_only(origin, seed))
            self._report(stages, self.sft_from(origin, seed, replies))
            if merged is not None:
                self._report(stages, self.distill_from(merged, seed, "teacher_reverse_kl", replay=0))
            on_seed(stages)
        return stages

    @staticmethod
    def _report(stages: list[Stage], stage: Stage) -> None:
        stages.append(stage)
        s = stage.scores
        chat = ("" if s.questions is None
                else f", chat questions {s.questions:.3f} (p {s.answer_probability:.3f})")
        drawn = "" if s.instructions_sampled is None else f"sampled {s.instructions_sampled:.3f}, "
        print(f"{stage.method} (seed {stage.seed}, {stage.steps} steps): cloze {s.cloze:.3f} "
              f"(p {s.cloze_probability:.3f}){chat}, instructions {s.instructions:.3f} "
              f"({drawn}looping {s.looping:.3f}), "
              f"{stage.seconds:.0f} s, {stage.cpu_seconds:.0f} CPU-s, load {stage.load:.1f}", flush=True)


class DocumentOrChatRenderer:
    """Mid-training data: an example with an empty prompt is a raw document (no chat template,
    ended by the tokenizer's end-of-text), any other is a chat turn through `chat`."""

    def __init__(self, chat: ChatRenderer) -> None:
        self.chat = chat
        self.stop_tokens = chat.stop_tokens
        tokenizer = chat.tokenizer
        end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.end_of_text = end_of_text if end_of_text in tokenizer.all_special_ids else tokenizer.eos_token_id

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.chat.prompt_tokens(prompt) if prompt else [self.end_of_text]

    def completion_tokens(self, prompt: str, completion: str) -> list[int]:
        if prompt:
            return self.chat.completion_tokens(prompt, completion)
        return [*self.chat.tokenizer.encode(completion, add_special_tokens=False), self.end_of_text]

    def tokens(self, prompt: str, completion: str) -> list[int]:
        return self.completion_tokens(prompt, completion)

    def decode(self, completion_tokens: list[int]) -> str:
        return self.chat.decode(completion_tokens)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit in this process, so that `finally` blocks and context managers
    (a LocalServer's stop) run before it exits."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_seeds(config: PersonalizationConfig, data_dir: Path, with_base: bool, rows_path: Path) -> None:
    """One worker: a server of its own under `data_dir`, the base model's scores if `with_base`, and
    each of `config.seeds`; after each seed, its rows and CPU-seconds go to `rows_path`."""
    os.environ.setdefault("STILLROOM_DTYPE", "bf16-train")
    os.environ.setdefault("STILLROOM_THREADS", "1")   # one torch thread a server: a worker a core
    stop_on_sigterm()   # so that a terminated worker still stops its server
    server = LocalServer(data_dir)
    with server:
        def save(stages: list[Stage]) -> None:
            rows_path.write_text(json.dumps({"cpu_seconds": round(cpu_seconds(server.pid), 1),
                                             "rows": [s.row() for s in stages]}) + "\n")

        service = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        Experiment(service, config, data_dir.parent / "personalization-logs", server.pid).run(
            on_seed=save, with_base=with_base)
        service.close()


def run_experiment(config: PersonalizationConfig, out_dir: Path, data_dir: Path, workers: int = 1,
                   argv: list[str] | None = None) -> list[dict]:
    """Every seed, spread over `workers` processes (each its own server: one torch thread each, so
    two workers use a 2-core machine's two cores); the report is rewritten as each worker saves."""
    start = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    groups = [list(config.seeds[i::workers]) for i in range(min(workers, len(config.seeds)))]
    paths = [data_dir / f"rows-{i}.json" for i in range(len(groups))]
    for path in paths:
        path.unlink(missing_ok=True)
    processes = [subprocess.Popen([sys.executable, "-m", "stillroom_cookbook.recipes.personalization",
                                   "--worker", str(i), "--data-dir", str(data_dir),
                                   "--seeds", *map(str, seeds), *(argv or [])])
                 for i, seeds in enumerate(groups)]
    seen: dict[Path, float] = {}
    stop_on_sigterm()
    try:
        while True:
            done = all(p.poll() is not None for p in processes)
            changed = [p for p in paths if p.exists() and p.stat().st_mtime != seen.get(p)]
            if changed or done:
                seen.update({p: p.stat().st_mtime for p in changed})
                rows = _save(config, out_dir, data_dir, paths, time.monotonic() - start)
            if done:
                break
            time.sleep(2)
    finally:   # stopped early (an error, Ctrl-C, SIGTERM): the workers stop their servers and exit
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait()
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"personalization workers {failed} failed; see the output above")
    print(f"wall time {(time.monotonic() - start) / 60:.1f} min; "
          f"wrote {out_dir}/personalization.json, personalization_table.md, personalization.png")
    return rows


def _save(config: PersonalizationConfig, out_dir: Path, data_dir: Path, paths: list[Path],
          wall: float) -> list[dict]:
    """Merge the workers' rows so far into personalization.json, the table and the plot."""
    saved = [json.loads(p.read_text()) for p in paths if p.exists()]
    rows = sorted((r for s in saved for r in s["rows"]), key=lambda r: (r["seed"], METHOD_ORDER[r["method"]]))
    if not rows:
        return rows
    cpu = sum(s["cpu_seconds"] for s in saved)
    loads = [r["load"] for r in rows]
    (out_dir / "personalization.json").write_text(json.dumps(
        {"config": _describe(config), "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
         "cpu_count": os.cpu_count(), "workers": len(paths), "mean_load": round(sum(loads) / len(loads), 2),
         "dtype": os.environ.get("STILLROOM_DTYPE", "bf16-train"), "rows": rows}, indent=1) + "\n")
    write_report(rows, out_dir, wall, data_dir / "personalization-logs", cpu, sum(loads) / len(loads))
    return rows


def _describe(config: PersonalizationConfig) -> dict:
    described = dataclasses.asdict(config)
    described["model_dir"] = config.model_dir.name
    return described


# the optional rows and scores: flag -> (config field, help)
OPTIONS = {
    "--plain-midtrain": ("plain_midtrain", "also mid-train on the documents alone, for contrast"),
    "--replay-control": ("replay_control", "also train the start on the replayed documents alone (no "
                                           "distillation), the exact loss's steps (default: on)"),
    "--pure-distill": ("pure_distill_row", "also distill (exact reverse KL) without the replayed documents"),
    "--merged-distill": ("merged_distill",
                         "also distill into a fresh LoRA on the merged mid-trained weights"),
    "--chat-questions": ("chat_questions", "also score the facts as a multiple-choice chat reply"),
    "--sampled-eval": ("sampled_eval", "also score instruction following at temperature 1"),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stillroom_cookbook.recipes.personalization",
                                     description=(__doc__ or "").splitlines()[0])
    default_dir = Path(os.environ.get("STILLROOM_MODELS_CACHE", ".stillroom/imported")) / MODEL_NAME
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--data-dir", type=Path, default=Path(".stillroom/personalization"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    parser.add_argument("--distill-steps", type=int, help="the exact loss's distillation steps (default: the "
                                                          "config's)")
    parser.add_argument("--sampled-steps", type=int,
                        help="the sampled estimate's steps (default: the config's)")
    for flag, (_, text) in OPTIONS.items():   # --x / --no-x; unset: the config's default
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
    parser.add_argument("--workers", type=int,
                        help="processes the seeds are spread over, each with its own server "
                             "(default: one per seed)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set for the worker processes
    parser.add_argument("--report-only", action="store_true",
                        help="redraw the table and plot from --out's personalization.json and the logs")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "personalization.json").read_text())
        write_report(saved["rows"], args.out, saved["wall_seconds"], args.data_dir / "personalization-logs",
                     saved.get("cpu_seconds"), saved.get("mean_load"))
        return
    config = PersonalizationConfig(model_dir=args.model_dir.expanduser().resolve(), seeds=tuple(args.seeds))
    if args.distill_steps is not None:
        distill_config = dataclasses.replace(config.distill, steps=args.distill_steps)
        config = dataclasses.replace(config, distill=distill_config)
    if args.sampled_steps is not None:
        config = dataclasses.replace(config, sampled_steps=args.sampled_steps)
    chosen = {flag: value for flag in OPTIONS
              if (value := getattr(args, flag[2:].replace("-", "_"))) is not None}
    config = dataclasses.replace(config, **{OPTIONS[flag][0]: value for flag, value in chosen.items()})
    config = smoke(config) if args.smoke else config
    data_dir = args.data_dir.resolve()
    if args.worker is not None:
        run_seeds(config, data_dir / f"worker-{args.worker}", args.worker == 0,
                  data_dir / f"rows-{args.worker}.json")
        return
    passed = ["--model-dir", str(config.model_dir), *(["--smoke"] if args.smoke else []),
              *(flag if value else "--no-" + flag[2:] for flag, value in chosen.items()),
              *(["--distill-steps", str(args.distill_steps)] if args.distill_steps is not None else []),
              *(["--sampled-steps", str(args.sampled_steps)] if args.sampled_steps is not None else [])]
    run_experiment(config, args.out, data_dir, args.workers or len(config.seeds), passed)


if __name__ == "__main__":
    main()
