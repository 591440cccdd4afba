"""The engine's scheduler: order within a lane, turns across lanes, batching across lanes; the pure
policy (what runs next) without threads, and the executor interleaving long jobs at their steps."""

from __future__ import annotations

import threading

from stillroom_server.engine.runtime.scheduler import Decision, Job, Policy, Scheduler, pause


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


# ------------------------------------------------------------------------ the policy, without threads

def decide(policy: Policy) -> Decision:
    decision = policy.next_batch()
    assert decision is not None
    return decision


def kind(decision: Decision) -> str:
    assert decision.job is not None
    return decision.job.kind


def single(lane, name):
    return Job(kind=name, run=lambda: name, done=lambda r, e: None, lane=lane)


def batchable(key, name):
    return Job(kind="sample", run=None, done=lambda r, e: None, lane="sampling", batch_key=key, payload=name)


def test_policy_resumes_a_parked_job_before_its_lane_runs_anything_else():
    policy = Policy(lambda job: job.batch_key or "")
    policy.submit(single("run-a", "fb"))
    policy.submit(single("run-a", "optim"))
    policy.submit(single("run-b", "b0"))
    first = decide(policy)
    assert (first.action, kind(first)) == ("start", "fb")
    policy.parked("run-a")  # fb stopped between two micro-batches
    assert kind(decide(policy)) == "b0"  # another lane's turn comes first
    policy.finished("run-b")
    assert decide(policy).action == "resume"  # then fb goes on, before optim
    policy.finished("run-a")
    assert kind(decide(policy)) == "optim"
    policy.finished("run-a")
    assert policy.next_batch() is None and policy.idle()


def test_policy_steps_a_busy_stream_in_turn_with_lanes_and_new_jobs_join_it():
    policy = Policy(lambda job: job.batch_key or "")
    policy.submit(batchable("w", "s1"))
    policy.submit(single("run-a", "fb"))
    step = decide(policy)
    assert (step.action, step.lane, [j.payload for j in step.joining]) == ("step", "w", ["s1"])
    policy.stepped("w", busy=True)  # rows still decoding
    policy.submit(batchable("w", "s2"))
    start = decide(policy)
    assert kind(start) == "fb"
    policy.parked("run-a")
    step = decide(policy)
    assert step.action == "step" and [j.payload for j in step.joining] == ["s2"]  # joins the running decode
    policy.stepped("w", busy=True)
    assert decide(policy).action == "resume"
    policy.finished("run-a")
    step = decide(policy)
    assert step.action == "step" and step.joining == []
    policy.stepped("w", busy=False)
    assert policy.next_batch() is None and policy.idle()


# ------------------------------------------------------------------------------------ the executor

def test_a_short_job_runs_between_the_steps_of_a_long_one_and_a_lane_keeps_its_order():
    events = []
    gate = threading.Event()

    def long_job(name):
        def run():
            for step in range(3):
                if step:
                    pause()
                events.append(f"{name}.{step}")
        return run

    scheduler = Scheduler({})
    scheduler.submit(Job(kind="gate", run=gate.wait, done=lambda r, e: None, lane="gate"))
    scheduler.submit(Job(kind="fb", run=long_job("fb1"), done=lambda r, e: None, lane="run-a"))
    scheduler.submit(Job(kind="fb", run=long_job("fb2"), done=lambda r, e: None, lane="run-a"))
    scheduler.submit(Job(kind="logprobs", run=lambda: events.append("short"), done=lambda r, e: None,
                         lane="sampling"))
    gate.set()
    scheduler.stop()
    assert events.index("short") < events.index("fb1.2")  # did not wait for the whole long job
    assert [e for e in events if e.startswith("fb")] == ["fb1.0", "fb1.1", "fb1.2", "fb2.0", "fb2.1", "fb2.2"]


def test_a_failing_job_reports_its_error_and_the_executor_goes_on():
    outcomes = []

    def fail():
        raise ValueError("bad")

    scheduler = Scheduler({})
    scheduler.submit(Job(kind="x", run=fail, done=lambda r, e: outcomes.append(e), lane="a"))
    scheduler.submit(Job(kind="y", run=lambda: 7, done=lambda r, e: outcomes.append(r), lane="a"))
    scheduler.stop()
    assert isinstance(outcomes[0], ValueError) and outcomes[1] == 7 and scheduler.outstanding == 0
