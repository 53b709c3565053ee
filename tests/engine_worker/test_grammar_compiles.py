"""Grammar compiles off the engine thread (engine_worker/grammar_compiles.py): a constrained request whose grammar
is not compiled yet waits unscheduled while the rest of the batch keeps stepping, requests for the same grammar
share one compile, an abort while compiling is clean, and the engine loop reports a compile that failed.

The seam: `grammar_for` (constraint -> llguidance grammar, the first thing every compile does) is held until the
test releases it, so a compile stays in flight exactly as long as the test needs; nothing here times real
compiles."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest

from contracts import FinishReason
from contracts.constraints import RegexConstraint
from contracts.grammar import grammar_for
from engine_worker import constraints
from engine_worker.engine_loop import EngineLoop
from engine_worker.validation import InvalidRequest
from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion, text_by_choice, tokens_by_choice
from tests.engine_worker.test_structured_decoding import PERSON, Person, constrained, masked_greedy

HOLD_S = 30.0  # a held compile gives up after this (so a failing test cannot hang)


class CompileGate:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []  # the thread each compile ran on

    def grammar_for(self, constraint):
        self.threads.append(threading.current_thread().name)
        self.started.set()
        self.release.wait(timeout=HOLD_S)
        return grammar_for(constraint)


@pytest.fixture
def held_compiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[CompileGate]:
    gate = CompileGate()
    monkeypatch.setattr(constraints, "grammar_for", gate.grammar_for)
    yield gate
    gate.release.set()


def collect(outputs: dict[str, list], step_outputs) -> None:
    for output in step_outputs:
        outputs.setdefault(output.request_id, []).append(output)


def test_a_slow_grammar_compile_does_not_stall_the_batch(
    engine_factory, hf_model, hf_greedy, held_compiles: CompileGate
) -> None:
    engine = engine_factory()
    engine.structured.compiler  # noqa: B018 (the llguidance tokenizer, built once per worker, is not measured here)
    free_prompt = prompt_of(9, 1)
    engine.add_request(make_request("free", free_prompt, temperature=0.0, max_tokens=24, ignore_eos=True))
    outputs: dict[str, list] = {}
    collect(outputs, engine.step())
    cases = {"person": prompt_of(9, 7), "person2": prompt_of(9, 8)}  # the same schema: one compile for both
    for name, prompt in cases.items():
        engine.add_request(constrained(name, prompt, PERSON, temperature=0.0, max_tokens=200))
    assert held_compiles.started.wait(timeout=HOLD_S)
    for _ in range(6):  # the compile is held all along
        collect(outputs, engine.step())
    assert set(outputs) == {"free"} and len(tokens_by_choice(outputs["free"])[0]) >= 7  # 1+ token per step
    waiting = [seq for name in cases for seq in engine._requests[name].seqs]
    assert all(seq.matcher is None and seq.slot is None and seq.num_computed_tokens == 0 for seq in waiting)
    assert engine.structured.compiling == 2
    held_compiles.release.set()
    for name, more in run_to_completion(engine).items():
        outputs.setdefault(name, []).extend(more)
    assert held_compiles.threads == ["inferq-grammar_0"]  # one compile, not on the engine's thread
    assert tokens_by_choice(outputs["free"])[0] == hf_greedy(free_prompt, 24)
    for name, prompt in cases.items():
        assert tokens_by_choice(outputs[name])[0] == masked_greedy(hf_model, engine, prompt, PERSON, 200), name
        Person.model_validate_json(text_by_choice(outputs[name])[0])


def test_a_request_aborted_while_its_grammar_compiles_never_runs(engine_factory, held_compiles: CompileGate) -> None:
    engine = engine_factory()
    engine.add_request(constrained("gone", prompt_of(9, 2), PERSON, temperature=0.0, max_tokens=50))
    assert held_compiles.started.wait(timeout=HOLD_S)
    engine.abort_request("gone")
    [aborted] = engine.step()
    assert aborted.finished and [c.finish_reason for c in aborted.choices] == [FinishReason.ABORT]
    assert not engine.has_unfinished_requests()
    # The id comes back (a new attempt) while the old compile still runs; that compile must not touch it.
    engine.add_request(make_request("gone", prompt_of(9, 3), temperature=0.0, max_tokens=12, ignore_eos=True))
    outputs: dict[str, list] = {}
    collect(outputs, engine.step())
    held_compiles.release.set()
    engine.structured.wait_for_compiles(HOLD_S)
    collect(outputs, engine.step())  # hands the finished compile back: the aborted request is dropped
    assert engine.structured.compiling == 0
    for name, more in run_to_completion(engine).items():
        outputs.setdefault(name, []).extend(more)
    assert len(tokens_by_choice(outputs["gone"])[0]) == 12
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.take_rejected()
    assert engine.structured.compiler.cache_len == 1  # the work is kept: the next request with it starts at once
    assert engine.structured.matchers_now(constrained("next", prompt_of(9, 4), PERSON), 1) is not None


def test_the_engine_loop_reports_a_failed_compile_and_waits_without_spinning(
    engine_factory, held_compiles: CompileGate
) -> None:
    engine = engine_factory()
    events: queue.SimpleQueue = queue.SimpleQueue()
    steps = 0
    step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counting_step
    loop = EngineLoop(
        engine,
        lambda outputs, stats: events.put(("outputs", outputs)),
        lambda request_id, exc: events.put(("rejected", request_id, exc)),
        lambda exc: events.put(("dead", exc)),
    )
    loop.start()
    try:
        loop.submit(constrained("bad", prompt_of(5), RegexConstraint(pattern="(unclosed")))
        assert held_compiles.started.wait(timeout=HOLD_S)
        before = steps
        time.sleep(0.5)  # only a compile in flight: the loop waits on it (steps of COMPILE_WAIT_S), never spins
        assert 0 < steps - before <= 100, steps - before
        held_compiles.release.set()
        deadline = time.monotonic() + HOLD_S
        while True:
            event = events.get(timeout=max(0.0, deadline - time.monotonic()))
            if event[0] != "outputs":
                break
        kind, request_id, exc = event
        assert (kind, request_id) == ("rejected", "bad")
        assert isinstance(exc, InvalidRequest) and str(exc).startswith("constraint:")
    finally:
        loop.stop()
