"""Client sessions, as Tinker's wire has them: one per `ServiceClient`, with heartbeats and a finish.

A session groups the training runs and sampling sessions a client made, so that finishing it can
release them. Sessions live in this process's memory (like sampling sessions) and do not survive a
restart; runs and checkpoints are in the store and do.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from stillroom_server.core.errors import FailedPrecondition, NotFound


@dataclass
class ClientSession:
    id: str
    owner: str
    tags: list[str]
    user_metadata: dict[str, str]
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    run_ids: list[str] = field(default_factory=list)
    finished: str | None = None        # the finish reason, once finished

    def touch(self) -> None:
        self.last_heartbeat = time.monotonic()


class ClientSessions:
    def __init__(self) -> None:
        self._sessions: dict[str, ClientSession] = {}

    def create(self, owner: str, tags: list[str], user_metadata: dict[str, str]) -> ClientSession:
        session = ClientSession("sess-" + uuid.uuid4().hex[:12], owner, list(tags), user_metadata)
        self._sessions[session.id] = session
        return session

    def get(self, owner: str, session_id: str, live: bool = True) -> ClientSession:
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"session_id: session '{session_id[:80]}' does not exist (sessions do not "
                           "survive a server restart)")
        if live and session.finished is not None:
            raise FailedPrecondition(f"session_id: session {session_id} was finished "
                                     f"({session.finished}); make a new ServiceClient")
        return session

    def list(self, owner: str) -> list[ClientSession]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def finish(self, owner: str, session_id: str, reason: str) -> ClientSession:
        session = self.get(owner, session_id, live=False)
        session.finished = session.finished or reason
        return session
