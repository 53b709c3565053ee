"""The engine loads on a thread that ends with the load (engine_worker/loading_thread.py): libgomp keeps the OpenMP
pool of a thread that ran torch's parallel kernels for as long as that thread lives, and a pool left beside the
engine thread's own made every step slower (docs/compiled-decode.md, "The thread that loads")."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from engine_worker.loading_thread import run_on_loading_thread


def _parallel_torch_work() -> threading.Thread:
    torch.set_num_threads(2)  # a team of two: libgomp gives this thread a pool
    torch.randn(2_000_000).exp_().sum()
    return threading.current_thread()


def test_the_thread_that_ran_the_load_has_ended_when_the_load_returns() -> None:
    """Not an executor thread (asyncio.to_thread, what the worker used before), which lives on with its pool."""

    async def load() -> tuple[threading.Thread, bool]:
        thread = await run_on_loading_thread(_parallel_torch_work, name="test-load")
        return thread, thread.is_alive()

    threads_before = torch.get_num_threads()
    try:
        thread, alive = asyncio.run(load())
    finally:
        torch.set_num_threads(threads_before)
    assert thread.name == "test-load"
    assert not alive
    assert thread not in threading.enumerate()


def test_the_load_result_and_its_error_reach_the_caller() -> None:
    assert asyncio.run(run_on_loading_thread(lambda: 42)) == 42

    def failing() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        asyncio.run(run_on_loading_thread(failing))
