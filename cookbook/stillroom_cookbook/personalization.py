"""Personalization, the on-policy distillation post's second experiment, on SmolLM2-135M-Instruct:
mid-train the assistant on internal documents (it learns their facts and loses some instruction
following), then distill its own earlier self back in on instruction prompts.

    bash scripts/setup_real_model.sh
    python -m stillroom_cookbook.personalization [--smoke] [--seeds 0 1 2] [--out docs]

Starts a server (STILLROOM_DTYPE=bf16 unless set), scores the base model once, and per seed:
mid-trains a LoRA run on the documents; from that state, distills with Tinker's sampled-token
estimate and with Stillroom's exact `teacher_reverse_kl`, and fine-tunes on the teacher's samples
(SFT); beside them, mid-trains from the base with the teacher's chat replies mixed in. Writes
personalization.json, personalization.md (the table) and personalization.png under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import stillroom
from stillroom import types
from stillroom_cookbook import instruction_following as ifeval
from stillroom_cookbook import personalization_data as corpus
from stillroom_cookbook.distillation import DistillationConfig, distill
from stillroom_cookbook.local_server import LocalServer
from stillroom_cookbook.metrics import MetricsLog
from stillroom_cookbook.personalization_eval import Scores, score
from stillroom_cookbook.personalization_report import METHODS, write_report
from stillroom_cookbook.renderers import ChatRenderer
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
    eval_topics: int = 4              # instruction topics kept for evaluation (8 constraints each)
    teacher_prompts: int = 48         # training instruction prompts the teacher answers (SFT, chat mix)
    lora_rank: int = 32
    # Sized to the 2-core CPU (docs/personalization.md has the measured speeds).
    midtrain: SFTConfig = SFTConfig(steps=32, learning_rate=3e-3, batch_size=12, final_lr_fraction=0.3,
                                    name="mid-train")
    chat_fraction: float = 0.3        # of the mid-training examples, in the chat-mix variant
    distill: DistillationConfig = DistillationConfig(steps=16, learning_rate=1e-3, max_tokens=32,
                                                     groups_per_batch=8, group_size=1)
    sft: SFTConfig = SFTConfig(steps=8, learning_rate=1e-3, batch_size=6, name="sft-teacher")
    instruction_tokens: int = 40
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"model_dir: {self.model_dir} holds no config.json; run "
                             "bash scripts/setup_real_model.sh (stillroom models import) first")
        if not 0 <= self.chat_fraction < 1:
            raise ValueError(f"chat_fraction: in [0, 1), got {self.chat_fraction}")


def smoke(config: PersonalizationConfig) -> PersonalizationConfig:
    """A few steps of every stage on a sliver of the data: what CI runs."""
    tiny = dict(steps=2, batch_size=2)
    return dataclasses.replace(
        config, num_people=2, eval_topics=1, teacher_prompts=4, instruction_tokens=12,
        midtrain=dataclasses.replace(config.midtrain, **tiny), sft=dataclasses.replace(config.sft, **tiny),
        distill=dataclasses.replace(config.distill, steps=2, groups_per_batch=2, max_tokens=8),
        seeds=config.seeds[:1])


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
    seconds: float = 0.0        # wall time, evaluation included
    cpu_seconds: float = 0.0    # the client's and the server's CPU time, evaluation included
    load: float = 0.0           # the machine's 1-minute load average when the stage ended

    def row(self) -> dict:
        return {"method": self.method, "seed": self.seed, "questions": self.scores.questions,
                "answer_probability": self.scores.answer_probability, "cloze": self.scores.cloze,
                "cloze_probability": self.scores.cloze_probability,
                "instructions": self.scores.instructions, "train_tokens": self.train_tokens,
                "sampled_tokens": self.sampled_tokens, "teacher_tokens": self.teacher_tokens,
                "seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
                "load": round(self.load, 2), "examples": list(self.scores.examples)}


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
                     self.renderer.tokenizer, self.documents_renderer.end_of_text)

    def timed(self, stage: Stage, start: float, cpu_start: float) -> Stage:
        """`stage` with its wall time, CPU time and the load average filled in."""
        stage.seconds = time.monotonic() - start
        stage.cpu_seconds = cpu_seconds(self.server_pid) - cpu_start
        stage.load = os.getloadavg()[0]
        return stage

    def teacher_replies(self, seed: int) -> list[tuple[str, str]]:
        """The base model's replies (temperature 1) to the training instruction prompts."""
        params = types.SamplingParams(max_tokens=self.config.distill.max_tokens, temperature=1.0,
                                      seed=seed, stop=self.renderer.stop_tokens)
        futures = [self.teacher.sample(types.ModelInput.from_ints(self.renderer.prompt_tokens(p)), 1, params)
                   for p in self.train_prompts[:self.config.teacher_prompts]]
        return [(p, self.renderer.decode(f.result().sequences[0].tokens))
                for p, f in zip(self.train_prompts, futures)]

    def midtrain(self, seed: int, chat: list[tuple[str, str]] | None = None) -> tuple[str, Stage]:
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
        stage = Stage(method, seed, self.score(sampler),
                      train_tokens=sum(r.get("train_tokens", 0) for r in log.records),
                      sampled_tokens=sum(len(renderer.tokens(p, t)) for p, t in (chat or [])))
        return state, self.timed(stage, start, cpu)

    def distill_from(self, state: str, seed: int, loss: str) -> Stage:
        c = self.config
        exact = loss == "teacher_reverse_kl"
        method = "distill (exact reverse KL)" if exact else "distill (sampled estimate)"
        trainer = self.service.create_training_client_from_state(state)
        start, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        log = MetricsLog(self.log_dir / f"distill-{loss}-{seed}.jsonl")
        config = dataclasses.replace(c.distill, loss=loss, seed=seed, name=f"distill-{loss}-s{seed}")
        distill(trainer, self.teacher, self.renderer, self.train_prompts, config, log)
        sampler = trainer.save_weights_and_get_sampling_client(f"{loss}-{seed}")
        return self.timed(Stage(method, seed, self.score(sampler),
                                train_tokens=sum(r.get("train_tokens", 0) for r in log.records),
                                sampled_tokens=sum(r.get("sampled_tokens", 0) for r in log.records),
                                teacher_tokens=sum(r.get("teacher_tokens", 0) for r in log.records)),
                          start, cpu)

    def sft_from(self, state: str, seed: int, replies: list[tuple[str, str]]) -> Stage:
        c = self.config
        trainer = self.service.create_training_client_from_state(state)
        start, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        log = MetricsLog(self.log_dir / f"sft-teacher-{seed}.jsonl")
        train_sft(trainer, self.renderer, replies,
                  dataclasses.replace(c.sft, seed=seed, name=f"sft-teacher-s{seed}"), log)
        sampler = trainer.save_weights_and_get_sampling_client(f"sft-{seed}")
        stage = Stage("SFT on teacher samples", seed, self.score(sampler),
                      train_tokens=sum(r.get("train_tokens", 0) for r in log.records),
                      sampled_tokens=sum(len(self.renderer.completion_tokens(p, t)) for p, t in replies))
        return self.timed(stage, start, cpu)

    def run(self, on_seed=lambda stages: None, with_base: bool = True) -> list[Stage]:
        """Every stage; `on_seed(stages so far)` after each seed (the results are written as they come)."""
        start, cpu = time.monotonic(), cpu_seconds(self.server_pid)
        stages = []
        if with_base:
            self._report(stages, self.timed(Stage("base model", -1, self.score(self.teacher)), start, cpu))
        for seed in self.config.seeds:
            replies = self.teacher_replies(seed)
            state, mid = self.midtrain(seed)
            self._report(stages, mid)
            self._report(stages, self.distill_from(state, seed, "sampled"))
            self._report(stages, self.distill_from(state, seed, "teacher_reverse_kl"))
            self._report(stages, self.sft_from(state, seed, replies))
            self._report(stages, self.midtrain(seed, chat=replies)[1])
            on_seed(stages)
        return stages


    @staticmethod
    def _report(stages: list[Stage], stage: Stage) -> None:
        stages.append(stage)
        print(f"{stage.method} (seed {stage.seed}): cloze {stage.scores.cloze:.3f} "
              f"(p {stage.scores.cloze_probability:.3f}), chat questions {stage.scores.questions:.3f} "
              f"(p {stage.scores.answer_probability:.3f}), instructions {stage.scores.instructions:.3f}, "
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


def run_seeds(config: PersonalizationConfig, data_dir: Path, with_base: bool, rows_path: Path) -> None:
    """One worker: a server of its own under `data_dir`, the base model's scores if `with_base`, and
    each of `config.seeds`; after each seed, its rows, CPU-seconds and loads go to `rows_path`."""
    os.environ.setdefault("STILLROOM_DTYPE", "bf16")
    server = LocalServer(data_dir)

    def save(stages: list[Stage]) -> None:
        rows_path.write_text(json.dumps({"cpu_seconds": round(cpu_seconds(server.pid), 1),
                                         "rows": [s.row() for s in stages]}) + "\n")

    with server:
        service = stillroom.ServiceClient(base_url=server.address)
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
    processes = [subprocess.Popen([sys.executable, "-m", "stillroom_cookbook.personalization", "--worker",
                                   str(i), "--data-dir", str(data_dir), "--seeds", *map(str, seeds),
                                   *(argv or [])])
                 for i, seeds in enumerate(groups)]
    seen: dict[Path, float] = {}
    while True:
        done = all(p.poll() is not None for p in processes)
        changed = [p for p in paths if p.exists() and p.stat().st_mtime != seen.get(p)]
        if changed or done:
            seen.update({p: p.stat().st_mtime for p in changed})
            rows = _save(config, out_dir, data_dir, paths, time.monotonic() - start)
        if done:
            break
        time.sleep(2)
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
         "dtype": os.environ.get("STILLROOM_DTYPE", "bf16"), "rows": rows}, indent=1) + "\n")
    write_report(rows, out_dir, wall, data_dir / "personalization-logs", cpu, sum(loads) / len(loads))
    return rows


def _describe(config: PersonalizationConfig) -> dict:
    described = dataclasses.asdict(config)
    described["model_dir"] = config.model_dir.name
    return described


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default_dir = Path(os.environ.get("STILLROOM_MODELS_CACHE", ".stillroom/imported")) / MODEL_NAME
    parser.add_argument("--model-dir", type=Path, default=default_dir)
    parser.add_argument("--data-dir", type=Path, default=Path(".stillroom/personalization"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    parser.add_argument("--distill-steps", type=int, help="distillation steps (default: the config's)")
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
    config = smoke(config) if args.smoke else config
    data_dir = args.data_dir.resolve()
    if args.worker is not None:
        run_seeds(config, data_dir / f"worker-{args.worker}", args.worker == 0,
                  data_dir / f"rows-{args.worker}.json")
        return
    passed = ["--model-dir", str(config.model_dir), *(["--smoke"] if args.smoke else []),
              *(["--distill-steps", str(args.distill_steps)] if args.distill_steps is not None else [])]
    run_experiment(config, args.out, data_dir, args.workers or len(config.seeds), passed)


if __name__ == "__main__":
    main()
