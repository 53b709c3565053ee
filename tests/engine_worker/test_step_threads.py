"""Threads by load (engine_worker/step_threads.py): the rule per step size, and that torch's thread count is only
set when it changes."""

from __future__ import annotations

from engine_worker.step_threads import StepThreadRule, StepThreads


def test_small_steps_get_the_small_step_threads_and_larger_steps_the_base() -> None:
    rule = StepThreadRule(base_threads=1, small_step_threads=2, small_step_rows=2)
    assert [rule.threads_for(rows) for rows in (1, 2, 3, 16, 512)] == [2, 2, 1, 1, 1]
    assert rule.threads_for(0) == 1  # an empty step changes nothing worth a second thread


def test_the_thread_count_is_set_only_when_it_changes() -> None:
    calls: list[int] = []
    threads = StepThreads(StepThreadRule(base_threads=1, small_step_threads=2, small_step_rows=1), calls.append)
    for rows in (1, 1, 4, 4, 1, 3):
        threads.before_step(rows)
    assert calls == [2, 1, 2, 1]
    assert threads.current == 1


def test_the_engine_switches_torch_threads_by_step_size(engine_factory) -> None:
    import torch

    from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion

    engine = engine_factory(torch_threads=1, small_step_threads=2, small_step_rows=1, num_speculative_tokens=0)
    seen: list[int] = []
    run = engine.runner.run

    def recording(*args, **kwargs):
        result = run(*args, **kwargs)
        seen.append(torch.get_num_threads())
        return result

    engine.runner.run = recording
    engine.add_request(make_request("r", prompt_of(12), temperature=0.0, max_tokens=4))
    run_to_completion(engine)
    torch.set_num_threads(1)
    assert seen[0] == 1  # the 12-token prefill
    assert seen[1:] and set(seen[1:]) == {2}  # one sequence decoding


def test_a_count_applied_on_one_thread_is_applied_again_on_another() -> None:
    """OpenMP's count is per thread: compiled graphs warm up on the loading thread, steps run on the engine thread,
    and a step there must not skip setting the count because the loading thread already had it."""
    import threading

    calls: list[tuple[str, int]] = []
    threads = StepThreads(
        StepThreadRule(base_threads=1, small_step_threads=2, small_step_rows=8),
        lambda count: calls.append((threading.current_thread().name, count)),
    )
    loading = threading.Thread(target=threads.before_step, args=(1,), name="loading")
    loading.start()
    loading.join()
    assert threads.current == 0  # nothing applied on this thread yet
    threads.before_step(1)
    threads.before_step(1)
    assert calls == [("loading", 2), (threading.current_thread().name, 2)]
    assert threads.current == 2
