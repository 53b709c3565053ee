"""A scripted engine for the worker's plumbing (engine loop, bridge): request i's choice 0 yields tokens
100, 101, ... one per step until max_tokens, like vLLM's MockEngineCore. It records the thread of every call,
so tests can prove that only `validate` runs anywhere but on the engine thread."""

from __future__ import annotations

import threading
import time

from contracts import ChoiceDelta, DeviceInfo, EmbedRequest, FinishReason, GenerateRequest, Usage, WorkerInfo
from engine_worker.outputs import EmbedOutput, EngineStats, RequestOutput
from engine_worker.validation import ContextLengthExceeded, InvalidRequest

MAX_MODEL_LEN = 32


class ScriptedEngine:
    def __init__(self, fail_at_step: int | None = None) -> None:
        self.requests: dict[str, tuple[GenerateRequest, int]] = {}  # id -> (request, tokens so far)
        self.pending: list[RequestOutput] = []
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.threads: set[int] = set()  # threads that called anything but validate
        self.proceed = threading.Event()  # tests that need a request in flight clear it
        self.proceed.set()

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def validate(self, request: GenerateRequest | EmbedRequest) -> None:
        if isinstance(request, GenerateRequest):
            needed = len(request.prompt_token_ids) + (request.sampling.max_tokens or 1)
            if needed > MAX_MODEL_LEN:
                # Worded without "context": the error's type, not its text, must pick the code.
                raise ContextLengthExceeded(f"{needed} tokens do not fit in {MAX_MODEL_LEN}")

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedOutput]:
        self._touch()
        return [EmbedOutput(r.request_id, [], Usage(prompt_tokens=sum(map(len, r.inputs)))) for r in requests]

    def add_request(self, request: GenerateRequest) -> None:
        self._touch()
        self.validate(request)
        if request.request_id in self.requests:
            raise InvalidRequest(f"request {request.request_id!r} is already running")
        self.requests[request.request_id] = (request, 0)

    def abort_request(self, request_id: str) -> None:
        self._touch()
        if self.requests.pop(request_id, None) is not None:
            self.pending.append(
                RequestOutput(request_id, [ChoiceDelta(finish_reason=FinishReason.ABORT)], finished=True, usage=Usage())
            )

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.requests or self.pending)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.proceed.wait(10)
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("scripted engine failure")
        outputs, self.pending = self.pending, []
        for request_id, (request, done) in list(self.requests.items()):
            finished = done + 1 >= (request.sampling.max_tokens or 1)
            choice = ChoiceDelta(
                text=f" t{done}", token_ids=[100 + done], finish_reason=FinishReason.LENGTH if finished else None
            )
            outputs.append(
                RequestOutput(
                    request_id,
                    [choice],
                    finished=finished,
                    usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=done + 1)
                    if finished
                    else None,
                )
            )
            if finished:
                del self.requests[request_id]
            else:
                self.requests[request_id] = (request, done + 1)
        return outputs

    def stats(self) -> EngineStats:
        self._touch()
        return EngineStats(running=len(self.requests), waiting=0, kv_cache_usage=0.0, preemptions=self.steps)


def scripted_worker_info(model: str, capacity: int = 4) -> WorkerInfo:
    """The registry entry of a bridge over a ScriptedEngine."""
    return WorkerInfo(
        worker_id="w1",
        model=model,
        model_source="scripted",
        max_model_len=MAX_MODEL_LEN,
        capacity=capacity,
        device=DeviceInfo(kind="cpu", name="cpu"),
        dtype="none",
        host="h",
        pid=1,
        started_at=time.time(),
        updated_at=time.time(),
        tokenizer_object="t",
    )
