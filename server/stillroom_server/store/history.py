"""The store's reads for the web console: a run's numbered requests that ended with a result, as
(number, kind, serialized FutureResult), newest first and bounded in rows and bytes. Results live
as long as their futures (repo.FUTURE_TTL), so this is what the store still holds, not the run's
whole history. It knows nothing of what a result contains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, func, select

from stillroom_server.store.models import FutureRow
from stillroom_server.store.repo import Store

_FUTURES = cast(Table, FutureRow.__table__)


@dataclass(frozen=True)
class RunResult:
    seq: int
    kind: str
    result: bytes


def run_results(store: Store, run_id: str, kinds: tuple[str, ...], max_rows: int,
                max_bytes: int) -> tuple[list[RunResult], bool]:
    """The run's newest finished requests of `kinds`, oldest first: at most `max_rows` of them and
    as many as fit in `max_bytes` of results. The flag says whether older ones were left out."""
    query = (select(_FUTURES.c.seq, _FUTURES.c.kind, _FUTURES.c.result)
             .where(_FUTURES.c.run_id == run_id, _FUTURES.c.status == "done",
                    _FUTURES.c.kind.in_(kinds), _FUTURES.c.result.is_not(None))
             .order_by(_FUTURES.c.seq.desc()).limit(max_rows + 1))
    rows: list[RunResult] = []
    size, truncated = 0, False
    with store.engine.connect() as connection:
        for seq, kind, result in connection.execute(query):
            size += len(result)
            if len(rows) == max_rows or size > max_bytes:
                truncated = True
                break
            rows.append(RunResult(int(seq), str(kind), bytes(result)))
    rows.reverse()
    return rows, truncated


def count_results(store: Store, run_id: str, kind: str, below_seq: int) -> int:
    """How many finished requests of `kind` the store holds for the run before number `below_seq`."""
    query = (select(func.count()).select_from(_FUTURES)
             .where(_FUTURES.c.run_id == run_id, _FUTURES.c.status == "done",
                    _FUTURES.c.kind == kind, _FUTURES.c.seq < below_seq))
    with store.engine.connect() as connection:
        return int(connection.execute(query).scalar() or 0)
