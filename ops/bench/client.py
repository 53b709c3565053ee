"""The server under test, driven through its OpenAI streaming API with a bare httpx client (the openai SDK's
per-chunk model parsing would show up in the client's share of the measured latency)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import structlog

from ops.bench.config import BenchConfig, BenchError
from ops.bench.metrics import RequestResult, inter_token_latencies
from ops.bench.prompts import local_decoder, words_for
from ops.bench.sse import SSEDecoder, SSEEvent
from ops.bench.workloads import ChatRequest, chat_payload

log = structlog.get_logger(__name__)

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class _Stream:
    """What one streamed response has delivered so far."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.times: list[float] = []
        self.counts: list[int] | None = []  # tokens per chunk, while every chunk reports running usage
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.error: str | None = None
        self.response_id: str | None = None
        self.cached_tokens: int | None = None
        self.text: list[str] = []  # the answer, for a multi-turn conversation's next request

    def on_event(self, event: SSEEvent, now: float) -> bool:
        """Record one event; True once the stream is finished ([DONE] or an error)."""
        if event.data.strip() == "[DONE]":
            return True
        try:
            chunk = json.loads(event.data)
        except json.JSONDecodeError:
            self.error = f"undecodable event: {event.data[:200]!r}"
            return True
        if event.event == "error" or "error" in chunk:
            self.error = _error_message(chunk)
            return True
        self._on_chunk(chunk, now)
        return False

    def _on_chunk(self, chunk: dict[str, Any], now: float) -> None:
        self.response_id = self.response_id or chunk.get("id")
        before = self.completion_tokens or 0
        usage = chunk.get("usage") or {}
        running = usage.get("completion_tokens")
        if running is not None:
            self.completion_tokens = running
        if usage.get("prompt_tokens") is not None:
            self.prompt_tokens = usage["prompt_tokens"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is not None:
            self.cached_tokens = cached
        if not (text := _chunk_text(chunk, self.chat)):
            return  # role-only, finish or usage chunk: no new token for the client
        self.text.append(text)
        self.times.append(now)
        if self.counts is not None:
            # Exact per-chunk counts need running usage on every token chunk (vLLM's continuous_usage_stats).
            self.counts = [*self.counts, running - before] if running is not None else None

    def result(self, start: float, end: float) -> RequestResult:
        if self.error is None and not self.times:
            self.error = "stream ended without a token"
        if self.error is not None:
            return RequestResult(start_s=start, e2e_s=end - start, error=self.error)
        total = self.completion_tokens if self.completion_tokens is not None else len(self.times)
        return RequestResult(
            start_s=start,
            e2e_s=end - start,
            ttft_s=self.times[0] - start,
            itl_s=inter_token_latencies(self.times, self.counts, total),
            output_tokens=total,
            prompt_tokens=self.prompt_tokens,
            response_id=self.response_id,
            token_times=self.times,
            cached_tokens=self.cached_tokens,
        )


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return text or ""


def _error_message(chunk: dict[str, Any]) -> str:
    error = chunk.get("error", chunk)
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


SPECULATION_COUNTERS = ("inferq:spec_decode_num_draft_tokens_total", "inferq:spec_decode_num_accepted_tokens_total")
PREFIX_CACHE_COUNTERS = ("inferq:prefix_cache_queries_total", "inferq:prefix_cache_hits_total")


class OpenAIStreamTarget:
    """Sends each prompt as one streaming request and measures it as the client sees it."""

    def __init__(self, cfg: BenchConfig, client: httpx.AsyncClient, model: str, name: str = "inferq") -> None:
        self.name = name
        self.model = model
        self.chat = cfg.endpoint == "chat"
        self.path = PATHS[cfg.endpoint]
        self.prompt_source = "token ids (exact)"
        self._cfg = cfg
        self.client = client
        self._texts: dict[tuple[int, ...], str] = {}
        self.extra_body: dict[str, Any] = {}  # fields added to every request (--structured: response_format)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        cfg: BenchConfig,
        *,
        base_url: str | None = None,
        name: str = "inferq",
        api_key: str | None = None,
        model: str | None = None,
    ) -> AsyncIterator[OpenAIStreamTarget]:
        """A target at `base_url` (default: --base-url, with --api-key and --model)."""
        streams = max(cfg.concurrency) + 2
        key = cfg.api_key if base_url is None else api_key
        url = base_url or cfg.base_url
        async with httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(cfg.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=streams, max_keepalive_connections=streams),
        ) as client:
            chosen = cfg.model if base_url is None else model
            yield cls(cfg, client, await discover_model(client, url, chosen), name=name)

    def with_body(self, name: str, extra_body: dict[str, Any]) -> OpenAIStreamTarget:
        """The same server (client, model, rendered prompts) as another target whose requests carry more fields."""
        target = copy.copy(self)
        target.name, target.extra_body = name, {**self.extra_body, **extra_body}
        return target

    async def speculation_counters(self) -> tuple[int, int] | None:
        """(draft tokens, accepted draft tokens) so far, summed over the server's workers, from its /metrics;
        None when the server has no such counters or does not let this key read them."""
        totals = await self.counters(SPECULATION_COUNTERS)
        return None if totals is None else (totals[0], totals[1])

    async def counters(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """These /metrics counters so far, each summed over the server's workers; None when the server has none
        of them or does not let this key read them."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            response = await self.client.get("/metrics")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        totals = dict.fromkeys(names, 0.0)
        seen = False
        try:
            for family in text_string_to_metric_families(response.text):
                for sample in family.samples:
                    if sample.name in totals:
                        totals[sample.name] += sample.value
                        seen = True
        except ValueError:  # not Prometheus text (a peer answering /metrics with something else)
            return None
        return tuple(int(totals[name]) for name in names) if seen else None

    async def prepare(self, prompts: list[list[int]]) -> None:
        """Chat takes text, not ids: render every prompt before the clock starts."""
        if not self.chat:
            return
        missing = [ids for ids in prompts if tuple(ids) not in self._texts]
        texts, self.prompt_source = await render_texts(self.client, self.model, missing, self._cfg)
        self._texts.update(zip(map(tuple, missing), texts, strict=True))

    async def __call__(self, ids: list[int]) -> RequestResult:
        result, _ = await self.send(self.path, self._payload(ids), chat=self.chat)
        return result

    async def send_chat(self, request: ChatRequest) -> tuple[RequestResult, str]:
        """One natural-language chat request (the realistic and multi-turn workloads); also the answer's text."""
        payload = chat_payload(request, self.model, self._cfg.output_len, self._cfg.temperature)
        result, text = await self.send(PATHS["chat"], payload, chat=True)
        result.turn = request.turn
        return result, text

    async def send(self, path: str, payload: dict[str, Any], *, chat: bool) -> tuple[RequestResult, str]:
        stream = _Stream(chat)
        start = time.perf_counter()
        try:
            async with self.client.stream("POST", path, json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    stream.error = f"HTTP {response.status_code}: {body[:300]}"
                else:
                    await _consume(response, stream)
        except httpx.HTTPError as exc:
            stream.error = f"{type(exc).__name__}: {exc}"
        return stream.result(start, time.perf_counter()), "".join(stream.text)

    def _payload(self, ids: list[int]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self._cfg.output_len,
            "ignore_eos": True,  # every request generates exactly output_len tokens
            "temperature": self._cfg.temperature,  # as the baseline samples
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._cfg.temperature > 0:
            payload["seed"] = self._cfg.seed
        if self.chat:
            payload["messages"] = [{"role": "user", "content": self._texts[tuple(ids)]}]
        else:
            payload["prompt"] = ids  # OpenAI accepts token ids: the prompt length is exact
        return payload | self.extra_body


async def _consume(response: httpx.Response, stream: _Stream) -> None:
    decoder = SSEDecoder()
    async for text in response.aiter_text():
        now = time.perf_counter()
        for event in decoder.feed(text):
            if stream.on_event(event, now):
                return


async def discover_model(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """Check the server answers at all, and pick the model id when none was given."""
    try:
        response = await client.get("/v1/models")
    except httpx.TransportError as exc:
        raise BenchError(f"cannot reach the server at {base_url}: {exc!r}. Is it running?") from exc
    if model:
        return model
    if response.status_code != 200:
        raise BenchError(f"GET /v1/models answered HTTP {response.status_code}: {response.text[:300]}")
    models = response.json().get("data") or []
    if not models:
        raise BenchError("the server lists no models (is a worker up?); pass --model")
    return str(models[0]["id"])


async def render_texts(
    client: httpx.AsyncClient, model: str, prompts: list[list[int]], cfg: BenchConfig
) -> tuple[list[str], str]:
    """Text for each id list: the server's /detokenize, else --tokenizer, else one word per token."""
    try:
        return [await _detokenize(client, model, ids) for ids in prompts], "server /detokenize"
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        log.info("server cannot detokenize; falling back", error=repr(exc))
    if cfg.tokenizer is not None:
        decode = local_decoder(cfg.tokenizer)
        return [decode(ids) for ids in prompts], f"local tokenizer {cfg.tokenizer}"
    return [words_for(ids) for ids in prompts], "APPROXIMATE: one word per token (no tokenizer)"


async def _detokenize(client: httpx.AsyncClient, model: str, ids: list[int]) -> str:
    response = await client.post("/detokenize", json={"model": model, "tokens": ids})
    response.raise_for_status()
    return str(response.json()["prompt"])
