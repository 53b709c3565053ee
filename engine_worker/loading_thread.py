"""Loading the engine on a thread that ends with the load.

OpenMP (libgomp, which torch's CPU kernels use) gives every thread that runs a parallel region a pool of worker
threads of its own, kept for as long as that thread lives. Once a process holds more OpenMP threads than there are
cores, libgomp stops spinning between regions, and every parallel region then wakes its workers through the
kernel. A model loaded (and its compiled steps warmed up) on a long-lived thread, such as asyncio's default
executor, leaves such a pool behind beside the engine thread's own: measured on 2 cores, SmolLM2's decode steps then
took 28-35 ms against 17-24 ms with two torch threads, and the compiled steps 22 ms against 12 ms
(docs/compiled-decode.md, "The thread that loads"). A thread that exits releases its pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_on_loading_thread(load: Callable[[], T], name: str = "engine-load") -> T:
    """`load()` on a new thread that ends when it returns (or raises, re-raised here); the event loop keeps
    running meanwhile."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def report(set_outcome: Callable[..., None], outcome: object) -> None:
        if not done.cancelled():
            set_outcome(outcome)

    def body() -> None:
        try:
            result = load()
        except Exception as exc:  # handed to the awaiting task, not lost on this thread
            loop.call_soon_threadsafe(report, done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(report, done.set_result, result)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    result = await done
    # The pool goes with the thread: wait for its exit (it is returning now) before the engine steps.
    await asyncio.to_thread(thread.join)
    return result
