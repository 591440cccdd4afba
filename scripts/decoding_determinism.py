"""Does greedy decoding of the personalization evaluation depend on how requests are batched?

Starts a server (one torch thread) at the given dtype and asks the base model for the 96 greedy
instruction replies three ways: all at once, all at once in reverse order, and in sequential chunks
of 7; counts the replies that differ. Also samples the 48 teacher replies twice with the same seeds
and times each piece of the evaluation (CPU-seconds of the server). Needs the imported model
(bash scripts/setup_real_model.sh).

    python scripts/decoding_determinism.py --dtype bf16     # or bf16-train, fp32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "bf16-train", "fp32"], default="bf16")
    parser.add_argument("--model-dir", type=Path,
                        default=Path(".stillroom/imported/smollm2-135m-instruct"))
    args = parser.parse_args()
    os.environ["STILLROOM_DTYPE"] = args.dtype
    os.environ.setdefault("STILLROOM_THREADS", "1")

    import stillroom
    from stillroom_cookbook.local_server import LocalServer
    from stillroom_cookbook.recipes.personalization import evaluation
    from stillroom_cookbook.recipes.personalization.experiment import (
        Experiment,
        PersonalizationConfig,
        cpu_seconds,
    )

    config = PersonalizationConfig(model_dir=args.model_dir.resolve())
    with tempfile.TemporaryDirectory() as data_dir, LocalServer(Path(data_dir)) as server:
        service = stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key)
        experiment = Experiment(service, config, Path(data_dir) / "logs", server.pid)
        sampler, renderer = experiment.teacher, experiment.renderer
        prompts = [i.prompt for i in experiment.eval_instructions]

        def timed(name: str, work: Callable[[], T]) -> T:
            began, cpu = time.monotonic(), cpu_seconds(server.pid)
            out = work()
            print(f"{name}: {time.monotonic() - began:.1f} s, {cpu_seconds(server.pid) - cpu:.1f} CPU-s "
                  f"({args.dtype})", flush=True)
            return out

        together, _ = timed("greedy, 96 x 40 tokens",
                            lambda: evaluation.greedy_replies(sampler, renderer, prompts, 40))
        reversed_, _ = evaluation.greedy_replies(sampler, renderer, prompts[::-1], 40)
        chunked = [reply for i in range(0, len(prompts), 7)
                   for reply in evaluation.greedy_replies(sampler, renderer, prompts[i:i + 7], 40)[0]]
        differ = [sum(a != b for a, b in zip(together, other)) for other in (reversed_[::-1], chunked)]
        print(f"greedy replies that differ from all-at-once: {differ[0]} of {len(prompts)} in reverse "
              f"order, {differ[1]} of {len(prompts)} in chunks of 7", flush=True)
        timed("one temperature-1 reply a prompt",
              lambda: evaluation.sampled_replies(sampler, renderer, prompts, 40))
        timed("chat questions", lambda: evaluation.choice_logprobs(sampler, renderer, experiment.questions))
        timed("cloze probe", lambda: evaluation.cloze_logprobs(
            sampler, renderer.tokenizer, experiment.questions, experiment.documents_renderer.end_of_text))
        first, second = experiment.teacher_replies(0), experiment.teacher_replies(0)
        print(f"teacher replies (seed 0) that differ between two samplings: "
              f"{sum(a != b for a, b in zip(first, second))} of {len(first)}", flush=True)
        service.close()


if __name__ == "__main__":
    main()
