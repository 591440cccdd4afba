"""Client sessions, as Tinker's wire has them: one per `ServiceClient`, with heartbeats and a finish.

A session groups the training runs and sampling sessions a client made, so that finishing it can
release them. A session whose client sends no heartbeat for `timeout` seconds lapses: the server
ends it as a finish would (older Tinker SDKs, 0.25 among them, have no `close()`, and a client
that dies sends no finish). Sessions live in this process's memory (like sampling sessions) and do not
survive a restart; runs and checkpoints are in the store and do. Ended sessions are remembered (the
newest MAX_ENDED of them), so that a call on one, or on a run or sampler it held, says how it ended.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from stillroom_server.core.errors import FailedPrecondition, NotFound

MAX_ENDED = 10_000  # ended sessions remembered, for the message a later call on one gets
LAPSED = "lapsed"   # the end reason of a session that lapsed


@dataclass
class ClientSession:
    id: str
    owner: str
    tags: list[str]
    user_metadata: dict[str, str]
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_heartbeat_at: float = field(default_factory=time.time)  # the same moment, wall clock
    run_ids: list[str] = field(default_factory=list)
    finished: str | None = None        # the finish reason, once finished ("lapsed" if it lapsed)
    ended_at: float | None = None
    why: str = ""                      # how it ended, as calls on it are told
    members: list[str] = field(default_factory=list)  # the runs and samplers it held when it ended

    def touch(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.last_heartbeat_at = time.time()

    @property
    def state(self) -> str:
        if self.finished is None:
            return "live"
        return LAPSED if self.finished == LAPSED else "finished"


class ClientSessions:
    def __init__(self, timeout: float = 0.0) -> None:
        self.timeout = timeout  # seconds without a heartbeat before a session lapses; 0: never
        self._sessions: dict[str, ClientSession] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # ended session ids, oldest first
        self._members: dict[str, str] = {}  # run and sampler ids of ended sessions -> the session

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
            raise FailedPrecondition(f"session_id: {session.why}; make a new ServiceClient")
        return session

    def list(self, owner: str) -> list[ClientSession]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def lapsed(self) -> list[ClientSession]:
        """Live sessions whose last heartbeat is more than `timeout` seconds old."""
        if self.timeout <= 0:
            return []
        cutoff = time.monotonic() - self.timeout
        return [s for s in self._sessions.values() if s.finished is None and s.last_heartbeat < cutoff]

    def finish(self, owner: str, session_id: str, reason: str) -> ClientSession:
        """Mark a session ended (once: a second finish keeps the first reason)."""
        session = self.get(owner, session_id, live=False)
        if session.finished is None:
            session.finished, session.ended_at = reason, time.time()
            if reason == LAPSED:
                session.why = (f"session {session.id} lapsed after {self.timeout:g} s without a "
                               "heartbeat (its client stopped sending them) and was ended: its training "
                               "runs left memory (their checkpoints stay)")
            else:
                session.why = (f"session {session.id} was finished ({reason}): its training runs left "
                               "memory (their checkpoints stay)")
        return session

    def remember(self, session: ClientSession, members: list[str]) -> None:
        """Keep an ended session and the runs and samplers it held, so calls on them say how it
        ended; the oldest ended sessions beyond MAX_ENDED are forgotten."""
        self._ended[session.id] = None
        session.members = list(members)
        for member in members:
            self._members[member] = session.id
        while len(self._ended) > MAX_ENDED:
            old_id, _ = self._ended.popitem(last=False)
            old = self._sessions.pop(old_id, None)
            for member in old.members if old else []:
                if self._members.get(member) == old_id:
                    del self._members[member]

    def ended_with(self, member_id: str) -> ClientSession | None:
        """The ended session that held this run or sampler, if one did (and is remembered)."""
        session_id = self._members.get(member_id)
        return self._sessions.get(session_id) if session_id else None
