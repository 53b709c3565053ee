"""A sim worker that dies on a poison input, for tests. `install(deaths_dir)`, run in the worker's process before
it boots (WorkerProcess's `preamble`), makes the sim engine SIGKILL its own process (what the kernel does to a
segfaulting or out-of-memory engine) mid-generation:
- on every worker, when a sequence whose prompt holds POISON_TOKEN has generated DIE_AFTER tokens there;
- when a sequence whose prompt holds FLAKY_TOKEN has generated DIE_AFTER tokens, until FLAKY_DEATHS workers died
  of it (counted in files under `deaths_dir`, which every worker of the test shares); then it runs to its end.
Other sequences get through DIE_AFTER tokens before a poison sequence admitted with them kills the worker."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

from engine_worker.sim import SimEngine

POISON_TOKEN = 13  # the sim tokenizer's "w13"
FLAKY_TOKEN = 14  # "w14"
FLAKY_DEATHS = 3  # one whole run of a line: the edge resumes it on 3 workers before it answers worker_lost
DIE_AFTER = 3


def install(deaths_dir: str) -> None:
    deaths = Path(deaths_dir)
    advance = SimEngine._advance

    def advance_or_die(self: SimEngine, item):
        prompt = item.request.prompt_token_ids
        if len(item.generated) >= DIE_AFTER:
            if POISON_TOKEN in prompt:
                os.kill(os.getpid(), signal.SIGKILL)
            if FLAKY_TOKEN in prompt and len(list(deaths.glob("flaky-*"))) < FLAKY_DEATHS:
                (deaths / f"flaky-{uuid.uuid4().hex}").touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return advance(self, item)

    SimEngine._advance = advance_or_die
