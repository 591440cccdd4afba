"""The sharded back end: training runs sharded over worker processes with torch.distributed FSDP2.

`backend.ShardedEngine` (in the server process) speaks the engine's interface and sends every
model call to rank 0 of a worker group (`group.WorkerGroup`), which broadcasts it to every rank
(`worker.py`); each rank runs it on FSDP2-sharded modules (`fsdp.py`) and rank 0 answers.
"""
