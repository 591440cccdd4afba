"""A server whose store is PostgreSQL (the `postgres` lane): migrated from an empty database at start,
it serves concurrent clients training, checkpointing and sampling, and keeps their records there."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, func, select

import stillroom
from stillroom import types

from conftest import TINY
from helpers import encode_line, sft_datum

pytestmark = pytest.mark.postgres

CLIENTS = 4


def train_and_sample(service: stillroom.ServiceClient, tokenizer, i: int) -> tuple[str, str, list[float]]:
    """Pipelined steps on a LoRA run of its own, a sampler checkpoint, and a sample from it."""
    trainer = service.create_lora_training_client(TINY, rank=4, seed=i)
    data = [sft_datum(encode_line(tokenizer, f"client {i} was here\n"))]
    forwards = []
    for _ in range(3):  # all sent before any is awaited: the server keeps their order
        forwards.append(trainer.forward_backward(data, "cross_entropy"))
        trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    losses = [f.result().metrics["loss:sum"] for f in forwards]
    sampler = trainer.save_weights_and_get_sampling_client(f"client-{i}")
    prompt = types.ModelInput.from_ints(encode_line(tokenizer, "client")[:-1])
    sample = sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=i)).result()
    assert len(sample.sequences) == 2
    assert sampler.model_path is not None
    return trainer.training_run_id, sampler.model_path, losses


def test_a_server_on_postgresql_serves_concurrent_clients(postgres_url, tmp_path):
    from stillroom_server.app import StillroomServer
    from stillroom_server.config import ServerConfig
    from stillroom_server.store.models import CheckpointRow, TrainingRunRow

    config = ServerConfig(data_dir=tmp_path, host="127.0.0.1", port=0, database_url=postgres_url)
    with StillroomServer(config) as server, \
            stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as service:
        tokenizer = service._load_tokenizer(TINY)
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(lambda i: train_and_sample(service, tokenizer, i), range(CLIENTS)))
        for _, _, losses in results:
            assert losses[0] != losses[1] != losses[2]  # each optim_step ran before the next forward
        rest = service.create_rest_client()
        listed = {r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs}
        assert {run_id for run_id, _, _ in results} <= listed
        for run_id, path, _ in results:
            assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [path]

    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(TrainingRunRow)) == CLIENTS
        assert connection.scalar(select(func.count()).select_from(CheckpointRow)) == CLIENTS
    engine.dispose()
