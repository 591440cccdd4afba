"""The engine's scheduler: order within a lane, turns across lanes, batching across lanes."""

from __future__ import annotations

import threading

from stillroom_server.engine.scheduler import Job, Scheduler


def run_jobs(submit_all):
    """Hold the worker on a gate job while `submit_all` queues jobs; return the order they ran."""
    ran, batches = [], []

    def batch_runner(key, payloads):
        batches.append(list(payloads))
        ran.extend(payloads)
        return payloads

    scheduler = Scheduler({"sample": batch_runner})
    gate = threading.Event()
    scheduler.submit(Job(kind="gate", run=gate.wait, done=lambda r, e: None, lane="gate"))

    def job(lane, name):
        return Job(kind="work", run=lambda: ran.append(name), done=lambda r, e: None, lane=lane)

    def sample(lane, name, key="w"):
        return Job(kind="sample", run=None, payload=name, batch_key=key, done=lambda r, e: None, lane=lane)

    submit_all(scheduler, job, sample)
    gate.set()
    scheduler.stop()  # runs everything queued, then returns
    return ran, batches


def test_a_long_lane_does_not_starve_a_short_one():
    def submit(scheduler, job, sample):
        for i in range(5):
            scheduler.submit(job("run-a", f"a{i}"))
        scheduler.submit(job("run-b", "b0"))
        scheduler.submit(job("run-b", "b1"))

    ran, _ = run_jobs(submit)
    assert [n for n in ran if n.startswith("a")] == ["a0", "a1", "a2", "a3", "a4"]
    assert ran.index("b0") == 1 and ran.index("b1") == 3  # turns: a0 b0 a1 b1 a2 ...


def test_sampling_jobs_for_the_same_weights_batch_across_lanes():
    def submit(scheduler, job, sample):
        scheduler.submit(sample("sampling:alice", "s1"))
        scheduler.submit(job("run-a", "a0"))
        scheduler.submit(sample("sampling:bob", "s2"))
        scheduler.submit(sample("sampling:bob", "other", key="v"))
        scheduler.submit(sample("sampling:alice", "s3"))

    ran, batches = run_jobs(submit)
    assert ["s1", "s2", "s3"] in batches and ["other"] in batches
