"""Child processes that cannot outlive their parent: each runs in its own process group (so a terminal's
Ctrl-C reaches only the supervisor, which stops children in order), gets SIGKILL if the parent dies (Linux),
and is stopped group-wide with SIGTERM → wait → SIGKILL."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO

_PR_SET_PDEATHSIG = 1
# sysexits.h EX_CONFIG: a process refused to start because of its configuration (an unsafe bind, say). A
# supervisor must not start it again unchanged: it would refuse again.
EXIT_CONFIG = 78


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive SIGKILL when the thread that forked it dies, or None where
    that is not available. SIGKILL, not SIGTERM: after the parent was killed nobody is left to escalate, and
    every child of ours tolerates a hard stop (JetStream recovers its store, queued work is redelivered)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl  # resolved before fork: the child should do as little as possible before exec
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # If the parent died between fork and prctl, the death signal will never come: leave now.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `argv` as the leader of a new session/process group.

    `die_with_parent` ties the child to the *calling thread* (that is how PR_SET_PDEATHSIG works): only use it
    from a thread that lives as long as the child should, normally the main thread."""
    preexec = die_with_parent_preexec() if die_with_parent else None
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=preexec,  # only prctl + getppid between fork and exec: no locks taken
    )


def terminate(proc: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> int:
    """Stop the child's whole process group: SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit
    code (negative = killed by that signal, as in Popen)."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Grandchildren that outlived the leader are still in its group: sweep them.
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM set `stop` instead of raising, so the caller shuts down in its own order.
    Previous handlers come back afterwards. Outside the main thread (where Python cannot install handlers)
    this does nothing and the caller is stopped through `stop` by whoever owns it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
