"""What the web console shows beyond Tinker's REST routes, for one owner: where each run is (in
memory, on disk, unloaded), a run's metrics by optimizer step, the owner's client sessions and the
server's state (queued work by kind, loaded adapters, memory).

Metrics come from the results the store still holds (they expire with their futures, FUTURE_TTL):
each forward_backward's metrics are folded into the step its optim_step closes, by their suffix
(":sum" summed over the step's requests, ":mean" averaged, ":max"/":min" as named, else the last),
and forward-only requests appear as "forward/<name>". Steps are counted over the held results.
Replies are plain JSON values; none names another owner's run, session or checkpoint (the server's
totals are counts, as /metrics gives them to anyone).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

from stillroom._proto import stillroom_pb2 as pb
from stillroom_server.core import validate
from stillroom_server.core.errors import InvalidInput
from stillroom_server.core.service import RunInfo, Service
from stillroom_server.store import history
from stillroom_server.store.repo import FUTURE_TTL

IN_MEMORY, ON_DISK, UNLOADED = "in_memory", "on_disk", "unloaded"
METRIC_KINDS = ("forward_backward", "forward", "optim_step")
DEFAULT_METRIC_REQUESTS = 2000
MAX_METRIC_REQUESTS = 20_000       # requests one metrics reply reads (the newest)
MAX_METRIC_BYTES = 64 << 20        # bytes of stored results one metrics reply reads
MAX_SERIES = 64                    # metric names one reply carries (a loss may name many)


def iso(moment: datetime | float | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, float | int):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def run_state(service: Service, run_id: str) -> str:
    """In memory, on disk (live, moved out to make room), or unloaded (not live: its client session
    ended, it was unloaded, or the server restarted; its checkpoints stay)."""
    if not service.is_live(run_id):
        return UNLOADED
    spilled = getattr(service.engine, "spilled_runs", None)   # back ends that never spill lack it
    return ON_DISK if spilled is not None and run_id in spilled() else IN_MEMORY


def run_summary(service: Service, owner: str, info: RunInfo) -> dict[str, Any]:
    return {"training_run_id": info.training_run_id, "base_model": info.base_model,
            "is_lora": info.is_lora, "lora_rank": info.lora_rank if info.is_lora else None,
            "state": run_state(service, info.training_run_id),
            "created": iso(info.created_at), "last_request_time": iso(info.last_request_time),
            "last_request_seq": info.last_request_seq,
            "num_trainable_params": info.num_trainable_params,
            "client_session": service.run_client_session(owner, info.training_run_id),
            "user_metadata": info.user_metadata or None}


def list_runs(service: Service, owner: str, limit: int, offset: int) -> dict[str, Any]:
    infos, total = service.list_runs(owner, limit, offset)
    return {"runs": [run_summary(service, owner, i) for i in infos],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


def run_metrics(service: Service, owner: str, run_id: str, max_requests: int) -> dict[str, Any]:
    """The run's metrics by optimizer step, from its newest `max_requests` held results."""
    run_id = validate.text(run_id, "run_id")
    if not 1 <= max_requests <= MAX_METRIC_REQUESTS:
        raise InvalidInput(f"requests: must be between 1 and {MAX_METRIC_REQUESTS}, got {max_requests}")
    service.own_run(owner, run_id)
    rows, truncated = history.run_results(service.store, run_id, METRIC_KINDS, max_requests,
                                          MAX_METRIC_BYTES)
    earlier = history.count_results(service.store, run_id, "optim_step", rows[0].seq) if rows else 0
    steps = _steps(rows, earlier)
    names = sorted({name for step in steps for name in step["metrics"]}, key=_metric_order)[:MAX_SERIES]
    for step in steps:
        step["metrics"] = {k: v for k, v in step["metrics"].items() if k in names}
    return {"training_run_id": run_id, "steps": steps, "series": names, "requests_read": len(rows),
            "truncated": truncated, "results_kept_seconds": int(FUTURE_TTL / timedelta(seconds=1))}


def _steps(rows: list[history.RunResult], earlier_steps: int) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    pending: dict[str, list[float]] = {}
    first_seq: int | None = None
    number = earlier_steps + 1
    for row in rows:
        result = pb.FutureResult.FromString(row.result)
        first_seq = row.seq if first_seq is None else first_seq
        if row.kind == "optim_step":
            for name, value in result.optim_step.metrics.items():
                pending.setdefault(name, []).append(value)
        else:
            prefix = "" if row.kind == "forward_backward" else "forward/"
            for name, value in result.forward_backward.metrics.items():
                pending.setdefault(prefix + name, []).append(value)
        if row.kind == "optim_step":
            steps.append(_step(number, first_seq, row.seq, pending, done=True))
            pending, first_seq, number = {}, None, number + 1
    if pending and first_seq is not None:   # requests of a step whose optim_step has not come yet
        steps.append(_step(number, first_seq, rows[-1].seq, pending, done=False))
    return steps


def _step(number: int, first_seq: int, last_seq: int, values: dict[str, list[float]],
          done: bool) -> dict[str, Any]:
    metrics = {name: _fold(name, series) for name, series in values.items()}
    return {"step": number, "first_seq": first_seq, "last_seq": last_seq, "done": done,
            "metrics": {k: v for k, v in metrics.items() if v is not None}}


def _fold(name: str, values: list[float]) -> float | None:
    """One step's value of a metric reported by several requests, by the metric's suffix."""
    suffix = name.rsplit(":", 1)[-1] if ":" in name else ""
    if suffix == "sum":
        value = math.fsum(values)
    elif suffix == "mean":
        value = math.fsum(values) / len(values)
    elif suffix == "max":
        value = max(values)
    elif suffix == "min":
        value = min(values)
    else:
        value = values[-1]
    return value if math.isfinite(value) else None   # JSON has no NaN


PREFERRED = ("loss:sum", "teacher_kl:mean", "grad_norm:value", "learning_rate:value")


def _metric_order(name: str) -> tuple[int, str]:
    return (PREFERRED.index(name) if name in PREFERRED else len(PREFERRED), name)


def sessions(service: Service, owner: str) -> dict[str, Any]:
    """The owner's client sessions, newest first, with the state of the runs each made."""
    listed = sorted(service.list_client_sessions(owner), key=lambda s: s.created_at, reverse=True)
    return {"sessions": [{
        "session_id": s.id, "state": s.state, "created": iso(s.created_at),
        "last_heartbeat": iso(s.last_heartbeat_at), "ended": iso(s.ended_at), "why": s.why or None,
        "tags": s.tags, "user_metadata": s.user_metadata or None,
        "runs": [{"training_run_id": r, "state": run_state(service, r)} for r in s.run_ids],
        "samplers": len(service.session_samplers(s.id))} for s in listed],
        "session_timeout_seconds": service.sessions.timeout}


def server_state(service: Service, owner: str) -> dict[str, Any]:
    """The server's queued work and memory (counts and bytes over every owner), and this owner's
    own share: their live runs and the bytes those hold against their budget."""
    facts = service.engine.facts()
    mine = [r for r, o in service.run_owners.items() if o == owner]
    return {
        "queued_by_kind": dict(sorted(service.engine.queued_by_kind().items())),
        "outstanding_jobs": service.engine.outstanding,
        "runs_in_memory": facts.get("runs_in_memory", 0), "runs_on_disk": facts.get("runs_on_disk", 0),
        "live_runs": len(service.run_owners),
        "run_memory_bytes_used": facts.get("run_memory_bytes_used", 0),
        "run_memory_bytes_budget": facts.get("run_memory_bytes_budget", 0),
        "loaded_adapters": facts.get("loaded_adapters", 0), "open_samplers": facts.get("open_samplers", 0),
        "owner": {"owner": owner, "live_runs": len(mine), "live_bytes": service.live_bytes(owner),
                  "live_bytes_budget": service.live_bytes_budget(),
                  "max_live_runs": service.limits.max_live_runs_per_owner},
        "models": service.supported_models(),
        "engines": service.engine.engines(),
    }
