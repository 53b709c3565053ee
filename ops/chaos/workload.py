"""The chaos run's clients: streaming chat that resumes on the other api replica with Last-Event-ID, non-streaming
chat with Idempotency-Key retries (some sent twice on purpose), batch jobs, and direct NATS publishers with
durable result subjects. Each compares what it got with the undisturbed greedy run (`References`) and records
an Outcome or a problem in the Ledger; none retries past its deadline (a request without an answer by then is a
hang, reported as a problem)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field

import httpx
import structlog
from nats.js import JetStreamContext

from broker import subjects
from broker.results import read_result
from broker.work_queue import publish_request
from contracts import GenerateRequest, SamplingParams
from ops.chaos.ledger import Ledger, Outcome

log = structlog.get_logger(__name__)

# Statuses a client retries on the other replica: the edge or the queue is passing through a fault.
RETRYABLE = {429, 500, 502, 503, 504}
REQUEST_DEADLINE_S = 150.0  # queue timeout (60 s) + a resume or two; past this a request hangs
BATCH_DEADLINE_S = 300.0  # 16 lines take 5-30 s undisturbed; a batch still running after this is stuck
# Longer than the edge's own limits (60 s queue timeout): a request the system gives up on gets its clear error
# before the client would give up on it.
TIMEOUT = httpx.Timeout(90.0, connect=5.0)
PROMPTS = [
    "hello",
    "tell me a story about a lighthouse",
    "w7 w8 w9 w10 w11 w12 w13 w14 w15",
    "what is the capital of the country with the most lakes in the world",
    "count: one two three four five six seven eight nine ten eleven twelve",
]
DIRECT_PROMPT_LENGTHS = (5, 17, 40)


def max_tokens_for(index: int) -> int:
    return 16 + 8 * (index % 3)  # 0.8-2 s at the sim's 20 tokens/s: faults land mid-stream


def chat_body(model: str, index: int, *, stream: bool = False) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[index]}],
        "max_tokens": max_tokens_for(index),
        "temperature": 0,
        "stream": stream,
    }


def direct_request(model: str, index: int, request_id: str, reply_subject: str) -> GenerateRequest:
    length = DIRECT_PROMPT_LENGTHS[index]
    return GenerateRequest(
        request_id=request_id,
        model=model,
        prompt_token_ids=[3 + i for i in range(length)],
        sampling=SamplingParams(max_tokens=max_tokens_for(index), temperature=0),
        reply_subject=reply_subject,
    )


@dataclass
class References:
    """The undisturbed greedy texts: chat by prompt index, direct publishes by prompt-length index."""

    chat: list[str] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)


class ClearError(Exception):
    """The system answered with an error in its own shape: an acceptable outcome, not a problem."""


def error_code(payload: dict) -> str:
    error = payload.get("error")
    if not isinstance(error, dict) or "message" not in error:
        raise ValueError(f"not the API's error shape: {payload}")
    return str(error.get("code") or error.get("type"))


@dataclass
class _Stream:
    request_id: str | None = None
    last_index: int = -1
    text: str = ""
    finish: str | None = None
    done: bool = False

    @property
    def last_event_id(self) -> str | None:
        return None if self.request_id is None else f"{self.request_id}/{self.last_index}"


class Workload:
    """Clients against `api_urls` and `js`, recording into `ledger`, each with a random generator of its own
    seeded from the run's seed."""

    def __init__(self, model: str, api_urls: list[str], js: JetStreamContext, references: References, ledger: Ledger):
        self.model = model
        self.api_urls = api_urls
        self.js = js
        self.refs = references
        self.ledger = ledger

    # --- streaming chat, resumed with Last-Event-ID -----------------------------------------------------

    async def streaming_client(self, name: str, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.ledger.seed}/{name}")
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            number = 0
            while not stop.is_set():
                await self._one_stream(http, rng, f"{name}.{number}")
                number += 1

    async def _one_stream(self, http: httpx.AsyncClient, rng: random.Random, label: str) -> None:
        index = rng.randrange(len(PROMPTS))
        body, key = chat_body(self.model, index, stream=True), f"{label}-{uuid.uuid4().hex[:8]}"
        api, stream, resumes, started = rng.randrange(len(self.api_urls)), _Stream(), 0, time.monotonic()
        while not stream.done:
            if time.monotonic() - started > REQUEST_DEADLINE_S:
                self.ledger.problem(
                    label,
                    f"stream without an end after {REQUEST_DEADLINE_S:.0f} s ({resumes} "
                    f"resumes, {stream.last_index + 1} chunks)",
                )
                return
            # Before the first chunk the key names the request (a retry attaches); after it, the last event id.
            headers = {"Idempotency-Key": key} if stream.request_id is None else {"Last-Event-ID": stream.last_event_id}
            try:
                async with http.stream(
                    "POST", f"{self.api_urls[api]}/v1/chat/completions", json=body, headers=headers
                ) as response:
                    if response.status_code != 200:
                        code = error_code(json.loads(await response.aread()))
                        if response.status_code not in RETRYABLE:
                            raise ClearError(f"{response.status_code} {code}")
                    else:
                        await self._read_sse(response, stream, label)
            except ClearError as exc:
                self.ledger.record(Outcome(label, "stream", False, time.monotonic() - started, resumes, str(exc)))
                return
            except (httpx.TransportError, ValueError) as exc:  # the replica died (or froze) under us
                if isinstance(exc, ValueError) and not isinstance(exc, json.JSONDecodeError):
                    self.ledger.problem(label, str(exc))
                    return
            if not stream.done:
                log.info("chaos.resume", client=label, after=stream.last_event_id, api=api)
                resumes += 1
                api = (api + 1) % len(self.api_urls)
                await asyncio.sleep(0.3)
        if stream.request_id is not None:
            self.ledger.keyed(key, stream.request_id)
        self._judge(
            label, "stream", stream.text, stream.finish, self.refs.chat[index], started, resumes, stream.request_id
        )

    async def _read_sse(self, response: httpx.Response, stream: _Stream, label: str) -> None:
        event_id = None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[len("id: ") :]
            elif line == "data: [DONE]":
                stream.done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    raise ClearError(f"stream error event {error_code(chunk)}")
                self._take_chunk(stream, event_id, chunk, label)

    def _take_chunk(self, stream: _Stream, event_id: str | None, chunk: dict, label: str) -> None:
        if event_id is None:
            raise ValueError(f"a chunk without an event id: {chunk}")
        request_id, _, index = event_id.rpartition("/")
        if stream.request_id not in (None, request_id) or int(index) != stream.last_index + 1:
            raise ValueError(f"after {stream.last_event_id} came {event_id}: a chunk repeated or skipped")
        stream.request_id, stream.last_index = request_id, int(index)
        for choice in chunk.get("choices", []):
            stream.text += choice.get("delta", {}).get("content") or ""
            stream.finish = choice.get("finish_reason") or stream.finish

    # --- non-streaming chat with Idempotency-Key retries ------------------------------------------------

    async def keyed_client(self, name: str, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.ledger.seed}/{name}")
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            number = 0
            while not stop.is_set():
                label, index = f"{name}.{number}", rng.randrange(len(PROMPTS))
                key, api = f"{label}-{uuid.uuid4().hex[:8]}", rng.randrange(len(self.api_urls))
                calls = [self._keyed_chat(http, label, index, key, api)]
                if rng.random() < 0.3:  # the same key again, on the other replica, while the first runs
                    calls.append(
                        self._keyed_chat(http, f"{label}.dup", index, key, api + 1, delay_s=rng.uniform(0, 1.5))
                    )
                await asyncio.gather(*calls)
                number += 1

    async def _keyed_chat(
        self, http: httpx.AsyncClient, label: str, index: int, key: str, api: int, delay_s: float = 0.0
    ) -> None:
        await asyncio.sleep(delay_s)
        started, resumes = time.monotonic(), 0
        while True:
            if time.monotonic() - started > REQUEST_DEADLINE_S:
                self.ledger.problem(label, f"no answer after {REQUEST_DEADLINE_S:.0f} s ({resumes} retries)")
                return
            url = f"{self.api_urls[api % len(self.api_urls)]}/v1/chat/completions"
            try:
                response = await http.post(url, json=chat_body(self.model, index), headers={"Idempotency-Key": key})
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                break
            if response is not None:
                code = error_code(response.json())
                if response.status_code not in RETRYABLE:
                    self.ledger.record(
                        Outcome(
                            label, "chat", False, time.monotonic() - started, resumes, f"{response.status_code} {code}"
                        )
                    )
                    return
            log.info("chaos.retry", client=label, key=key, status=response and response.status_code)
            resumes += 1
            api += 1
            await asyncio.sleep(0.5)
        answer = response.json()
        self.ledger.keyed(key, answer["id"])
        choice = answer["choices"][0]
        self._judge(
            label,
            "chat",
            choice["message"]["content"] or "",
            choice["finish_reason"],
            self.refs.chat[index],
            started,
            resumes,
            answer["id"],
        )

    # --- direct NATS publishers (durable result subjects) -----------------------------------------------

    async def direct_client(self, name: str, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.ledger.seed}/{name}")
        number = 0
        while not stop.is_set():
            label, index = f"{name}.{number}", rng.randrange(len(DIRECT_PROMPT_LENGTHS))
            request_id = f"chaos{uuid.uuid4().hex}"
            request = direct_request(self.model, index, request_id, subjects.results_subject(name, request_id))
            started = time.monotonic()
            text, finish = await self.direct_answer(label, request, started)
            if text is not None:
                self._judge(label, "direct", text, finish, self.refs.direct[index], started, 0, request_id)
            number += 1

    async def direct_answer(
        self, label: str, request: GenerateRequest, started: float
    ) -> tuple[str | None, str | None]:
        while True:  # publish: retried with the same Nats-Msg-Id, so it is queued once
            try:
                await publish_request(self.js, request, retry_for_s=30)
                break
            except Exception as exc:  # noqa: BLE001 - every failure is retried until the deadline
                if time.monotonic() - started > REQUEST_DEADLINE_S:
                    self.ledger.problem(label, f"could not publish for {REQUEST_DEADLINE_S:.0f} s: {exc!r}")
                    return None, None
                await asyncio.sleep(1)
        while time.monotonic() - started < REQUEST_DEADLINE_S:
            try:
                result = await read_result(self.js, request.reply_subject, wait_s=10)
            except Exception:  # noqa: BLE001 - a node down or an election: read again
                await asyncio.sleep(1)
                continue
            if result.finished:
                last = result.events[-1]
                if last.kind == "error":
                    self.ledger.record(
                        Outcome(
                            label,
                            "direct",
                            False,
                            time.monotonic() - started,
                            0,
                            f"error event {last.error.code.value}",
                        )
                    )
                    return None, None
                text = "".join(
                    choice.text
                    for event in result.events
                    if event.kind == "tokens"
                    for choice in event.choices
                    if choice.index == 0
                )
                finish = next(
                    (
                        choice.finish_reason.value
                        for event in result.events
                        if event.kind == "tokens"
                        for choice in event.choices
                        if choice.finish_reason
                    ),
                    None,
                )
                return text, finish
        self.ledger.problem(label, f"no finished result after {REQUEST_DEADLINE_S:.0f} s")
        return None, None

    # --- batch jobs --------------------------------------------------------------------------------------

    async def batch_client(self, name: str, stop: asyncio.Event, lines: int) -> None:
        """Batches one after another until `stop` is set; each must end `completed` with one line per custom_id."""
        rng = random.Random(f"{self.ledger.seed}/{name}")
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            number = 0
            while not stop.is_set():
                await self._one_batch(http, rng, f"{name}.{number}", lines)
                number += 1

    async def _one_batch(self, http: httpx.AsyncClient, rng: random.Random, label: str, count: int) -> None:
        started = time.monotonic()
        indexes = {f"{label}-line{i}": rng.randrange(len(PROMPTS)) for i in range(count)}
        content = "".join(
            json.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": chat_body(self.model, index),
                }
            )
            + "\n"
            for custom_id, index in indexes.items()
        )
        upload = await self._retrying(
            http,
            label,
            "POST",
            "/v1/files",
            files={"file": ("chaos.jsonl", content.encode())},
            data={"purpose": "batch"},
        )
        batch = upload and await self._retrying(
            http,
            label,
            "POST",
            "/v1/batches",
            json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
        if batch is None:
            return
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() - started > BATCH_DEADLINE_S:
                self.ledger.problem(label, f"batch {batch['id']} still {batch['status']}: {batch['request_counts']}")
                return
            await asyncio.sleep(1)
            batch = await self._retrying(http, label, "GET", f"/v1/batches/{batch['id']}")
            if batch is None:
                return
        if batch["status"] != "completed":
            self.ledger.problem(label, f"batch {batch['id']} ended {batch['status']}: {batch.get('errors')}")
            return
        seen: dict[str, int] = dict.fromkeys(indexes, 0)
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                for line in (await self._retrying_text(http, label, f"/v1/files/{file_id}/content")).splitlines():
                    self._judge_batch_line(label, json.loads(line), indexes, seen, started)
        wrong = {custom_id: n for custom_id, n in seen.items() if n != 1}
        if wrong:
            self.ledger.problem(label, f"batch {batch['id']}: lines not exactly once (custom_id: times) {wrong}")

    def _judge_batch_line(
        self, label: str, line: dict, indexes: dict[str, int], seen: dict[str, int], started: float
    ) -> None:
        custom_id = line["custom_id"]
        seen[custom_id] = seen.get(custom_id, 0) + 1
        response = line.get("response") or {}
        if line.get("error") or response.get("status_code") != 200:
            self.ledger.record(
                Outcome(
                    custom_id,
                    "batch-line",
                    False,
                    time.monotonic() - started,
                    0,
                    f"batch line error {line.get('error') or response.get('status_code')}",
                )
            )
            return
        choice = response["body"]["choices"][0]
        self._judge(
            custom_id,
            "batch-line",
            choice["message"]["content"] or "",
            choice["finish_reason"],
            self.refs.chat[indexes[custom_id]],
            started,
            0,
            response.get("request_id"),
        )

    async def _retrying(self, http: httpx.AsyncClient, label: str, method: str, path: str, **kwargs) -> dict | None:
        """A batch/file call, retried on the other replica while the edge passes through a fault."""
        response = await self._retrying_response(http, label, method, path, **kwargs)
        return None if response is None else response.json()

    async def _retrying_text(self, http: httpx.AsyncClient, label: str, path: str) -> str:
        response = await self._retrying_response(http, label, "GET", path)
        return "" if response is None else response.text

    async def _retrying_response(
        self, http: httpx.AsyncClient, label: str, method: str, path: str, **kwargs
    ) -> httpx.Response | None:
        started, api, last = time.monotonic(), 0, ""
        while time.monotonic() - started < REQUEST_DEADLINE_S:
            try:
                response = await http.request(method, f"{self.api_urls[api % len(self.api_urls)]}{path}", **kwargs)
                if response.status_code == 200:
                    return response
                last = f"{response.status_code} {response.text[:200]}"
                if response.status_code not in RETRYABLE:
                    break
            except httpx.TransportError as exc:
                last = repr(exc)
            api += 1
            await asyncio.sleep(0.5)
        self.ledger.problem(label, f"{method} {path} failed: {last}")
        return None

    # --- the one comparison -----------------------------------------------------------------------------

    def _judge(
        self,
        label: str,
        kind: str,
        text: str,
        finish: str | None,
        expected: str,
        started: float,
        resumes: int,
        request_id: str | None = None,
    ) -> None:
        seconds = time.monotonic() - started
        if finish != "length" or text != expected:
            self.ledger.problem(
                label,
                f"{kind} answer of {request_id} differs from the undisturbed run (finish "
                f"{finish!r}, {resumes} resumes, {seconds:.1f} s): got {text!r}, "
                f"expected {expected!r}",
            )
        self.ledger.record(Outcome(label, kind, True, seconds, resumes))
