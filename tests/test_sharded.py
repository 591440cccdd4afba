"""Runs sharded over two worker processes (FSDP2 on gloo) behave as the single-process engine: the
same requests give the same losses, logprobs, samples and weights; a state saved by either loads
in the other and continues; a killed worker fails its requests clearly and the server keeps serving.

Two real servers on real ports share one data directory and database: `--workers 2` and the
default in-process engine, driven through the SDK with the same requests.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import socket
import subprocess
import sys

import pytest
import torch

import stillroom
from stillroom import types
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig
from stillroom_server.engine.models.presets import build_char_tokenizer

from conftest import TINY
from helpers import checkpoint_tensors, encode_line, sft_datum

pytestmark = pytest.mark.slow
LR = 1e-2
TEXTS = ["the quick brown fox", "jumps over the lazy dog", "Stillroom shards its runs."]
PARAMS = types.SamplingParams(max_tokens=12, temperature=1.0, seed=11)

# How close "the same" is. Both engines compute in fp32 (unit roundoff U = 2^-23) the same sums in
# another order: the single engine runs the three datums as one padded batch; the sharded one runs
# datums 0 and 2 on rank 0 and datum 1 on rank 1 (other shapes, so other GEMM blocking; another SIMD
# width under ATEN_CPU_CAPABILITY=avx2) and adds the ranks' gradients over gloo. char-1m: LAYERS
# layers whose widest sum has WIDEST terms (the MLP's; a batch's ~80 rows summed into a weight's
# gradient are fewer), and VOCAB tokens.
U = torch.finfo(torch.float32).eps
LAYERS, WIDEST, VOCAB = 6, 384, 100
# The same weights, one forward: a K-term sum taken in another order moves by about sqrt(K) U of its
# terms' size (the roundings add as a random walk; K U is the worst case), in each layer: logprobs
# agree to FORWARD of their size (1.4e-5; measured on AVX-512 and AVX2: 1e-7, a few ulps).
FORWARD = LAYERS * math.sqrt(WIDEST) * U
# One optimizer step: Adam divides each gradient component by its own size (m/sqrt(v) stays within
# 1.002 of 1 in the first steps with these betas), so every weight moves by about LR however small its
# gradient, and a component whose sum cancels keeps its terms' absolute rounding: allow the worst case,
# K U of the terms, for each layer the backward pass goes through. The two engines' steps differ by up
# to UPDATE x LR per weight (2.7e-4 x LR), and these differences add up step by step. gloo's one more
# addition (U) and the clip norm's sum of 1e6 squares (pairwise, about log2(1e6) U) are far below it.
UPDATE = LAYERS * WIDEST * U


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(single, sharded): two servers over one data directory and SQLite store."""
    data_dir = tmp_path_factory.mktemp("sharded-data")
    # engines=0: the sharded back end in the server process, so a test can kill one of its workers
    single = StillroomServer(ServerConfig(data_dir=data_dir, port=0, engines=0)).start()
    sharded = StillroomServer(ServerConfig(data_dir=data_dir, port=0, workers=2, engines=0)).start()
    yield single, sharded
    sharded.stop()
    single.stop()


@pytest.fixture(scope="module")
def clients(servers):
    made = [stillroom.ServiceClient(base_url=s.address, api_key=s.local_api_key) for s in servers]
    yield made
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def data():
    tokenizer = build_char_tokenizer()  # the presets' own
    return [sft_datum(encode_line(tokenizer, text)) for text in TEXTS]


def _trainer(client, kind: str):
    if kind == "lora":
        return client.create_lora_training_client(TINY, rank=4, seed=3)
    return client.create_full_training_client(TINY, seed=3)


def _step(trainer, data) -> tuple[float, list[float]]:
    """One forward_backward + optim_step: the loss and every datum's logprobs (flattened)."""
    forward = trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=LR, grad_clip_norm=1.0))
    result = forward.result()
    return result.metrics["loss:sum"], [v for out in result.loss_fn_outputs for v in out["logprobs"].data]


def _scores(trainer, data) -> list[float]:
    result = trainer.forward(data, "cross_entropy").result()
    return [v for out in result.loss_fn_outputs for v in out["logprobs"].data]


def _gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def _tolerance(logprobs: list[float], moved: float) -> float:
    """How far apart the two engines' `logprobs` may be, after steps that moved the logprobs by `moved`
    (the sum over the steps of the largest change one step made): FORWARD of their size, and, to first
    order, UPDATE of the steps' movement (weights apart by UPDATE of each step move a logprob by about
    UPDATE of what the steps moved it; measured: 6e-6 of it at most, on AVX2)."""
    return FORWARD * max(abs(v) for v in logprobs) + UPDATE * moved


def _kl_tolerance(logprobs: list[float], moved: float, kl: float) -> float:
    """A reverse KL's, summed over the data's n tokens: with errors of at most t in log p and log q, a
    position's KL = sum_v p(v)(log p(v) - log q(v)) moves, to first order, by at most
    t(1 + E_p|log p - log q|) (sum_v p(v) d log p(v) = sum_v dp(v) = 0), where E_p|log p - log q| <=
    KL + 2 TV(p, q) <= KL + sqrt(2 KL) (log x <= x - 1, then Pinsker); summed, by Cauchy-Schwarz:
    t(n + KL + sqrt(2 n KL)). (t at the targets' logprobs' size: the ones the p-weighted sums weigh.)"""
    n, kl = len(logprobs), max(kl, 0.0)
    return _tolerance(logprobs, moved) * (n + kl + math.sqrt(2 * n * kl))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sharded_training_matches_the_single_process_engine(servers, clients, data, kind):
    trainers = [_trainer(client, kind) for client in clients]
    moved, last = 0.0, None
    for _ in range(4):
        (loss_1, logprobs_1), (loss_2, logprobs_2) = (_step(t, data) for t in trainers)
        moved += _gap(logprobs_1, last) if last else 0.0
        last = logprobs_1
        # the loss is the sum of the -logprobs of its tokens (weights 1): the sum of their tolerances
        assert abs(loss_1 - loss_2) <= len(logprobs_1) * _tolerance(logprobs_1, moved)
        assert _gap(logprobs_1, logprobs_2) <= _tolerance(logprobs_1, moved)
    assert last is not None
    moved += _gap(_scores(trainers[0], data), last)   # the fourth step's movement

    # the weights (and AdamW moments) the two wrote are the same, in the same files: apart by UPDATE x
    # LR a step (x 1.002, Adam's), and U of their size for their own rounding. Not every weight: one
    # whose gradient cancels to about its rounding takes a step that its rounding sizes (Adam divides
    # by the gradient's own size; measured: 3e-5 for one weight after the 4 steps, 3 x the bound), so
    # the bound holds for each tensor's root mean square difference (measured: 1.4e-6 at most).
    paths = [t.save_state(f"{kind}-4").result().path for t in trainers]
    weights = [checkpoint_tensors(s, p) for s, p in zip(servers, paths)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        rms = (tensor - weights[1][name]).pow(2).mean().sqrt().item()
        assert rms <= 4 * LR * UPDATE * 1.002 + U * tensor.abs().max().item(), name

    # sampling and logprobs from their sampler weights agree too
    samplers = [t.save_weights_and_get_sampling_client(f"{kind}-4s") for t in trainers]
    prompt = types.ModelInput.from_ints(data[0].model_input.to_ints()[:5])
    # (the same seed draws the same uniforms: a token could differ only where a draw fell within the
    # logprobs' tolerance of a boundary between two tokens)
    samples = [s.sample(prompt, 2, PARAMS).result() for s in samplers]
    assert [q.tokens for q in samples[0].sequences] == [q.tokens for q in samples[1].sequences]
    for one, two in zip(samples[0].sequences, samples[1].sequences):
        logprobs = list(one.logprobs or [])
        assert _gap(logprobs, list(two.logprobs or [])) <= _tolerance(logprobs, moved)
    sequence = types.ModelInput.from_ints(data[1].model_input.to_ints())
    scored = [s.compute_logprobs(sequence).result() for s in samplers]
    assert _gap(scored[0][1:], scored[1][1:]) <= _tolerance(scored[0][1:], moved)

    # a teacher's distributions (its sampler weights, sharded on the workers) give the same loss
    teacher = {"teacher": samplers[0].model_path if kind == "lora" else TINY}
    kl = [t.forward_backward(data, "teacher_reverse_kl", teacher).result().metrics["loss:sum"]
          for t in trainers]
    assert abs(kl[0] - kl[1]) <= _kl_tolerance(last, moved, kl[0])


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("saver", [1, 0], ids=["saved-sharded", "saved-single"])
def test_a_state_saved_by_one_back_end_continues_in_the_other(clients, data, kind, saver):
    """Saved with W=2 and loaded with W=1, or the other way round: the loaded run scores as the
    saver does, and its AdamW moments came along (a fresh optimizer's step differs by about 1.5)."""
    loader = 1 - saver
    original = _trainer(clients[saver], kind)
    for _ in range(3):
        _step(original, data)
    path = original.save_state(f"cross-{kind}-{saver}").result().path
    resumed = clients[loader].create_training_client_from_state_with_optimizer(path)
    scores = _scores(original, data)
    assert _gap(scores, _scores(resumed, data)) <= _tolerance(scores, 0.0)   # the same weights
    moved, last = 0.0, scores
    for _ in range(2):
        _, logprobs_original = _step(original, data)
        _, logprobs_resumed = _step(resumed, data)
        moved, last = moved + _gap(logprobs_original, last), logprobs_original
        assert _gap(logprobs_original, logprobs_resumed) <= _tolerance(logprobs_original, moved)


def test_a_killed_worker_fails_its_requests_clearly_and_the_server_keeps_serving(servers, clients, data):
    sharded, client = servers[1], clients[1]
    trainer = _trainer(client, "full")
    _step(trainer, data)
    state = trainer.save_state("before-the-kill").result().path
    sampler = trainer.save_weights_and_get_sampling_client("before-the-kill-s")

    victim = sharded.engine.group.processes[1]
    in_flight = trainer.forward_backward(data * 8, "cross_entropy")
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(stillroom.FailedPreconditionError,
                       match=rf"worker rank 1 \(pid {victim.pid}\) was killed by signal SIGKILL.*"
                             rf"last saved state is {state}"):
        in_flight.result()

    # the run stays gone, saying where to resume from, as after a restart
    with pytest.raises(stillroom.FailedPreconditionError, match=f"last saved state is {state}"):
        trainer.forward_backward(data, "cross_entropy").result()
    # the server still serves: a fresh group samples the saved weights and resumes the state
    prompt = types.ModelInput.from_ints(data[0].model_input.to_ints()[:5])
    assert len(sampler.sample(prompt, 1, PARAMS).result().sequences[0].tokens) > 0
    resumed = client.create_training_client_from_state_with_optimizer(state)
    loss, _ = _step(resumed, data)
    assert loss > 0


def test_a_group_launched_by_torchrun_connects_and_trains(tmp_path, monkeypatch, data):
    """The launch for several machines, on one: torchrun starts the workers (env:// rendezvous)
    and rank 0 connects to the server's --worker-listen address with the shared secret."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    secret = secrets.token_hex(32)
    monkeypatch.setenv("STILLROOM_WORKER_AUTHKEY", secret)
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "stillroom_server.engine.sharded.worker"],
        env={**os.environ, "STILLROOM_WORKER_ADDRESS": f"127.0.0.1:{port}"})
    try:
        config = ServerConfig(data_dir=tmp_path, port=0, workers=2, worker_listen=f"127.0.0.1:{port}")
        with StillroomServer(config) as server, \
                stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as client:
            trainer = _trainer(client, "lora")
            losses = [_step(trainer, data)[0] for _ in range(3)]
            assert losses[2] < losses[0]
        assert launch.wait(timeout=60) == 0  # the server's stop ends the group
    finally:
        if launch.poll() is None:
            launch.kill()
