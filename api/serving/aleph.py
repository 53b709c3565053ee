"""Aleph Alpha surface: `/complete` (plain and streamed), `/models_available`, `/models/{model}/tokenizer`.
Same queue requests as the OpenAI surface; only the request mapping and the response shapes differ."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from api.catalog import ServedModel
from api.engine_client import Generation, merge
from api.errors import ApiError, api_error_body
from api.schemas.aleph import AlephCompleteRequest, PromptItem, TextItem
from api.services import Services
from api.serving.completion_parts import (
    build_requests,
    check_token_ids,
    collect,
    finite,
    new_id,
    until_disconnected,
)
from api.serving.token_pieces import split_into_tokens
from api.streaming import primed, sse_response
from contracts import ErrorCode, SamplingParams, TokenLogprob

NICE_PRIORITY = 1  # `?nice=true`: scheduled after requests at the default priority 0 (lower runs first)

# Aleph Alpha's finish_reason vocabulary; a stop with a string reason hit a stop sequence, else the end of text.
_LENGTH, _END_OF_TEXT, _STOP_SEQUENCE = "maximum_tokens", "end_of_text", "stop_sequence_reached"


def finish_reason(reason: str | None, stop_reason: str | int | None) -> str | None:
    if reason == "length":
        return _LENGTH
    if reason == "stop":
        return _STOP_SEQUENCE if isinstance(stop_reason, str) else _END_OF_TEXT
    return reason


def prompt_token_ids(prompt: str | Sequence[PromptItem], tokenizer) -> list[int]:
    """Text items are tokenized (special tokens only where the prompt starts), token_ids items taken as they are."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    ids: list[int] = []
    for item in prompt:
        ids += tokenizer.encode(item.data, add_special_tokens=not ids) if isinstance(item, TextItem) else item.data
    return ids


def log_probs_body(entries: Sequence[TokenLogprob | None], unscored_token: str = "") -> list[dict]:
    """One `{token: logprob}` dict per token: the chosen token and the top alternatives. A None entry (the first
    echoed prompt token, which nothing predicts) is `{unscored_token: null}`."""
    return [
        {unscored_token: None}
        if entry is None
        else {entry.token: finite(entry.logprob), **{alt.token: finite(alt.logprob) for alt in entry.top}}
        for entry in entries
    ]


@dataclass(frozen=True, slots=True)
class _Job:
    body: AlephCompleteRequest
    model: str
    response_id: str
    generation: Generation
    sampling: SamplingParams
    prompt: list[int]
    tokenizer: Any

    def fields(self, text: str, pieces: Sequence[str], logprobs: Sequence[TokenLogprob | None]) -> dict:
        """The completion fields a response or a stream chunk carries. We never rewrite the model's output, so
        `raw_completion` equals `completion`; `completion_tokens` is `completion` split into its tokens."""
        fields: dict = {"completion": text, "raw_completion": text}
        if self.body.log_probs is not None:
            fields["log_probs"] = log_probs_body(logprobs, self.tokenizer.decode(self.prompt[:1]))
        if self.body.tokens:
            fields["completion_tokens"] = list(pieces)
        return fields

    def pieces(self, token_ids: Sequence[int], text: str, context: Sequence[int]) -> list[str]:
        """The generated `text` cut at its tokens (only computed when `tokens` was asked for)."""
        if not self.body.tokens:
            return []
        return split_into_tokens(
            self.tokenizer, token_ids, text, context=context, skip_special_tokens=self.sampling.skip_special_tokens
        )

    def echoed(self, prompt_logprobs: Sequence[TokenLogprob | None] | None) -> tuple[str, list[str], list]:
        """What `echo` puts before the first completion text: the prompt, its pieces and their log_probs."""
        if not self.body.echo:
            return "", [], []
        text = self.tokenizer.decode(self.prompt)  # as written, special tokens included
        pieces = (
            split_into_tokens(self.tokenizer, self.prompt, text, skip_special_tokens=False) if self.body.tokens else []
        )
        return text, pieces, list(prompt_logprobs or [])

    def summary(self, prompt_tokens: int, generated: int) -> dict:
        # Aleph Alpha counts the prompt once per candidate (n or best_of).
        return {
            "num_tokens_prompt_total": prompt_tokens * self.sampling.num_candidates,
            "num_tokens_generated": generated,
        }


async def complete(body: AlephCompleteRequest, services: Services, http: Request, *, nice: bool):
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompt = prompt_token_ids(body.prompt, tokenizer)
    check_token_ids([prompt], len(tokenizer))
    sampling = body.sampling()
    response_id = new_id("cmpl")
    [request] = build_requests(services, model, [prompt], sampling, response_id, priority=NICE_PRIORITY if nice else 0)
    job = _Job(body, model.id, response_id, await services.engine.submit(request), sampling, prompt, tokenizer)
    if body.stream:
        # Wait for the first chunk so "no worker" or a queue timeout is a status the client retries on.
        return sse_response(await until_disconnected(http, primed(_stream(job))), done=False, error_event=_error_event)
    return await until_disconnected(http, _collect(job))


def _error_event(exc: ApiError) -> dict:
    # The client dispatches stream items on `type`; an error item at least names itself and carries the message.
    return {"type": "error", **api_error_body(exc)}


async def _collect(job: _Job) -> dict:
    collected = await collect([job.generation], job.body.n)
    text, pieces, logprobs = job.echoed(collected.prompt_logprobs.get(0))
    completions = [
        {
            "index": index,
            **job.fields(
                text + "".join(state.text),
                [*pieces, *job.pieces(state.token_ids, "".join(state.text), job.prompt)],
                [*logprobs, *state.logprobs],
            ),
            "finish_reason": finish_reason(state.finish_reason, state.stop_reason),
        }
        for index, state in sorted(collected.choices.items())
    ]
    usage = collected.usages[0]
    return {
        "id": job.response_id,
        "model_version": job.model,
        "completions": completions,
        **job.summary(usage.prompt_tokens, usage.completion_tokens),
    }


async def _stream(job: _Job) -> AsyncIterator[dict]:
    """stream_chunk per delta, stream_summary when a choice ends, completion_summary last (no `[DONE]`)."""
    generated: dict[int, list[int]] = {}  # per choice, the prompt and the tokens streamed so far (context)
    summary = job.summary(0, 0)
    async for _, event in merge([job.generation]):
        if event.kind == "end":
            summary = job.summary(event.usage.prompt_tokens, event.usage.completion_tokens)
            continue
        for delta in event.choices:
            text, pieces, logprobs = "", [], []
            if delta.index not in generated:
                generated[delta.index] = list(job.prompt)
                text, pieces, logprobs = job.echoed(event.prompt_logprobs)
            pieces += job.pieces(delta.token_ids, delta.text, generated[delta.index])
            generated[delta.index] += delta.token_ids
            if delta.text or delta.token_ids or text:
                yield {
                    "type": "stream_chunk",
                    "index": delta.index,
                    **job.fields(text + delta.text, pieces, [*logprobs, *(delta.logprobs or [])]),
                }
            if delta.finish_reason is not None:
                yield {
                    "type": "stream_summary",
                    "index": delta.index,
                    "model_version": job.model,
                    "finish_reason": finish_reason(delta.finish_reason.value, delta.stop_reason),
                }
    yield {"type": "completion_summary", **summary}


async def models_available(services: Services) -> list[dict]:
    return [await _model_entry(services, model) for model in await services.catalog.models()]


async def _model_entry(services: Services, model: ServedModel) -> dict:
    tokenizer = await services.catalog.tokenizer(model)
    return {
        "name": model.id,
        "description": f"{model.root}, served by inferq on {len(model.workers)} worker(s)",
        "hostings": [],
        "max_context_size": model.max_model_len,
        "maximum_completion_tokens": model.max_model_len - 1,
        "image_support": False,
        "qa_support": False,
        "summarization_support": False,
        "embedding_types": [],
        # What we can tell without guessing: a model that ships a chat template was tuned to follow one.
        "aligned": bool(getattr(tokenizer, "chat_template", None)),
    }


async def tokenizer_json(services: Services, model_id: str) -> str:
    """The `tokenizers` JSON the client's `tokenizer(model)` loads with `Tokenizer.from_str`."""
    tokenizer = await services.catalog.tokenizer(await services.catalog.get(model_id))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"the model {model_id!r} has no fast tokenizer to export")
    return backend.to_str()
