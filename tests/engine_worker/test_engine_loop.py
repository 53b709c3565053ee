"""The engine thread, with a scripted engine: outputs and stats come out through the callbacks, every engine call
but `validate` runs on the loop's own thread, rejections keep their type, a dying engine is reported."""

from __future__ import annotations

import queue
import threading

from contracts import EmbedRequest, FinishReason, GenerateRequest, SamplingParams
from engine_worker.engine_loop import EngineLoop
from engine_worker.outputs import EngineStats, RequestOutput
from engine_worker.validation import InvalidRequest
from tests.engine_worker.scripted import ScriptedEngine

WAIT_S = 30.0  # generous: the machine is shared


def request(request_id: str, max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        model="m",
        prompt_token_ids=[1, 2],
        reply_subject="x",
        sampling=SamplingParams(max_tokens=max_tokens),
    )


class Recorder:
    def __init__(self, engine: ScriptedEngine) -> None:
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.callback_threads: set[int] = set()
        self.loop = EngineLoop(engine, self.outputs, self.rejected, self.dead)

    def outputs(self, outputs: list, stats: EngineStats | None) -> None:
        self.callback_threads.add(threading.get_ident())
        self.events.put(("outputs", outputs, stats))

    def rejected(self, key: str, exc: Exception) -> None:
        self.events.put(("rejected", key, exc))

    def dead(self, exc: BaseException) -> None:
        self.events.put(("dead", exc, None))

    def until(self, predicate) -> list:
        seen = []
        while True:
            event = self.events.get(timeout=WAIT_S)
            seen.append(event)
            if predicate(event):
                return seen


def _finished(request_id: str):
    return lambda e: e[0] == "outputs" and any(o.request_id == request_id and o.finished for o in e[1])


def test_outputs_and_stats_come_from_the_engine_thread_only() -> None:
    engine = ScriptedEngine()
    recorder = Recorder(engine)
    recorder.loop.start()
    try:
        recorder.loop.submit(request("a", max_tokens=3))
        seen = recorder.until(_finished("a"))
        tokens = [c.token_ids[0] for e in seen if e[0] == "outputs" for o in e[1] for c in o.choices]
        assert tokens == [100, 101, 102]
        # The engine ran dry with that step: its stats came with it, counting nothing running.
        assert seen[-1][2] is not None and seen[-1][2].running == 0 and seen[-1][2].preemptions == engine.steps
    finally:
        recorder.loop.stop()
    assert engine.threads == recorder.callback_threads == {recorder.loop._thread.ident}
    assert threading.get_ident() not in engine.threads


def test_a_rejected_request_keeps_its_type_and_the_loop_goes_on() -> None:
    engine = ScriptedEngine()
    recorder = Recorder(engine)
    recorder.loop.start()
    try:
        engine.proceed.clear()  # hold "a" in flight so its duplicate meets it
        recorder.loop.submit(request("a", max_tokens=2))
        recorder.loop.submit(request("a", max_tokens=2))
        (*_, (kind, key, exc)) = recorder.until(lambda e: e[0] == "rejected")
        assert key == "a" and isinstance(exc, InvalidRequest) and "already running" in str(exc)
        engine.proceed.set()
        recorder.until(_finished("a"))
    finally:
        recorder.loop.stop()


def test_abort_and_embed_go_through_the_command_queue() -> None:
    engine = ScriptedEngine()
    recorder = Recorder(engine)
    recorder.loop.start()
    try:
        engine.proceed.clear()
        recorder.loop.submit(request("long", max_tokens=20))
        recorder.loop.abort("long")
        engine.proceed.set()
        seen = recorder.until(_finished("long"))
        last = [o for o in seen[-1][1] if o.request_id == "long"][0]
        assert isinstance(last, RequestOutput) and last.choices[0].finish_reason == FinishReason.ABORT
        recorder.loop.embed(EmbedRequest(request_id="e", model="m", inputs=[[1, 2, 3]], reply_subject="x"))
        (*_, (_, outputs, stats)) = recorder.until(lambda e: e[0] == "outputs" and e[1][0].request_id == "e")
        assert outputs[0].usage.prompt_tokens == 3 and stats is None
    finally:
        recorder.loop.stop()
    assert engine.threads == {recorder.loop._thread.ident}


def test_a_failing_engine_is_reported_dead() -> None:
    engine = ScriptedEngine(fail_at_step=2)
    recorder = Recorder(engine)
    recorder.loop.start()
    try:
        recorder.loop.submit(request("a", max_tokens=5))
        (*_, (kind, exc, _)) = recorder.until(lambda e: e[0] == "dead")
        assert isinstance(exc, RuntimeError) and "scripted engine failure" in str(exc)
    finally:
        recorder.loop.stop()
