"""A server restarted on the same data dir keeps what it saved: runs and checkpoints are in the
store, sampler weights sample exactly as before, and a run whose weights were only in memory says
so instead of silently training fresh weights."""

from __future__ import annotations

import pytest

import stillroom
from stillroom import types
from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.app import StillroomServer
from stillroom_server.config import ServerConfig

from conftest import TINY
from helpers import sft_datum


@pytest.mark.slow   # three server starts, each with its engine process
def test_saved_weights_survive_a_restart_and_lost_runs_say_so(tmp_path):
    config = ServerConfig(data_dir=tmp_path, host="127.0.0.1", port=0)
    tokens = [1, 40, 41, 42, 43, 2]
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    with StillroomServer(config) as server, \
            stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as client:
        trainer = client.create_lora_training_client(TINY, rank=4, seed=0)
        trainer.forward_backward([sft_datum(tokens)], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2))
        state = trainer.save_state("kept-state").result().path
        sampler = trainer.save_weights_and_get_sampling_client("kept")
        before = sampler.sample(types.ModelInput.from_ints(tokens[:2]), 2, params).result()
        run_id, path = trainer.training_run_id, sampler.model_path

    with StillroomServer(config) as server, \
            stillroom.ServiceClient(base_url=server.address, api_key=server.local_api_key) as client:
        sampler = client.create_sampling_client(model_path=path)
        after = sampler.sample(types.ModelInput.from_ints(tokens[:2]), 2, params).result()
        assert [s.tokens for s in after.sequences] == [s.tokens for s in before.sequences]
        trainer = stillroom.TrainingClient(client, client._connection.run(client._connection.call(
            "GetTrainingRun", pb.GetTrainingRunRequest(training_run_id=run_id))))
        assert trainer.get_info().training_run_id == run_id
        with pytest.raises(stillroom.FailedPreconditionError,
                           match=f"restarted.*last saved state is {state}"):
            trainer.forward_backward([sft_datum(tokens)], "cross_entropy").result()
