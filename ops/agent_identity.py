"""A node agent's id that outlives its process. It is kept in the agent's data dir, so an agent restarted there
(by `inferq serve` after a crash, or by hand) recognises the deployments it held in NATS KV and starts their
workers again. The id is held under an exclusive lock for the agent's life: a second agent started on the same
data dir gets a fresh id of its own (it works normally; only its deployments are not restored after a restart)."""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger(__name__)

_ID_FILE = "agent-id"
_LOCK_FILE = "agent-id.lock"
_ID_SHAPE = re.compile(r"a[0-9a-f]{12}")


def new_agent_id() -> str:
    return f"a{uuid.uuid4().hex[:12]}"


@dataclass
class AgentIdentity:
    agent_id: str
    _lock: IO[str] | None = None  # open while this process owns the data dir's id; the kernel drops it on death

    @property
    def kept(self) -> bool:
        """Whether the id is the data dir's (a restart here gets it back)."""
        return self._lock is not None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def claim_identity(data_dir: Path) -> AgentIdentity:
    """The data dir's agent id (made on first use), or a fresh one if another live agent holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / _LOCK_FILE).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        agent_id = new_agent_id()
        log.warning("agent.identity_in_use", data_dir=str(data_dir), agent_id=agent_id)
        return AgentIdentity(agent_id)
    path = data_dir / _ID_FILE
    try:
        agent_id = path.read_text().strip()
    except FileNotFoundError:
        agent_id = ""
    if not _ID_SHAPE.fullmatch(agent_id):
        agent_id = new_agent_id()
        staging = path.with_name(f"{_ID_FILE}.{os.getpid()}")
        staging.write_text(agent_id + "\n")
        staging.replace(path)  # a crash mid-write never leaves half an id
    return AgentIdentity(agent_id, lock)
