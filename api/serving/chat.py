"""`POST /v1/chat/completions`: messages → the model's chat template → queue request → OpenAI chat shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request

from api.affinity import chat_key
from api.auth.caller import get_caller
from api.engine_client import Generation, merge
from api.errors import ApiError
from api.schemas.openai import ChatCompletionRequest, ChatMessage
from api.services import Services
from api.serving.generation import (
    build_requests,
    chat_logprobs,
    collect,
    prompt_logprobs_body,
    until_disconnected,
    usage_body,
)
from api.serving.reattach import NEW, Reattach, reattach_from, start
from api.streaming import sse_response
from api.structured import check_before_queueing
from contracts import ErrorCode, Usage


def render_chat(
    messages: Sequence[ChatMessage],
    tokenizer,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
) -> list[int]:
    """The model's chat template applied to the messages, as token ids (shared by chat and /tokenize)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            ErrorCode.INVALID_REQUEST, "this model has no chat template; use /v1/completions", param="messages"
        )
    if continue_final_message and messages[-1].role != "assistant":
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            "continue_final_message needs a final assistant message",
            param="continue_final_message",
        )
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": message.role, "content": message.text()} for message in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
        )
    except Exception as exc:  # template errors (e.g. role order a template forbids) are the client's input
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    # The template writes its own special tokens; vLLM's add_special_tokens (default off) adds the tokenizer's.
    return tokenizer.encode(rendered, add_special_tokens=add_special_tokens)


async def create_chat_completion(body: ChatCompletionRequest, services: Services, http: Request):
    reattach = reattach_from(http.headers, "chatcmpl", get_caller(http).owner)
    model, response_id, generation = await _submit(body, services, reattach)
    if body.stream:
        return sse_response(
            _stream(body, model, response_id, generation), event_ids=reattach.event_ids(response_id, generations=1)
        )
    return await until_disconnected(http, _collect(body, model, response_id, generation))


async def chat_completion_response(body: ChatCompletionRequest, services: Services) -> dict:
    """The non-streaming response body, without an HTTP request (the batch runner runs each line this way)."""
    return await _collect(body, *await _submit(body, services))


async def chat_completion_chunks(body: ChatCompletionRequest, services: Services) -> AsyncIterator[dict]:
    """Submit the request; the chunk objects of its stream (framed as SSE events or WebSocket messages)."""
    model, response_id, generation = await _submit(body, services)
    return _stream(body, model, response_id, generation)


async def _submit(
    body: ChatCompletionRequest, services: Services, reattach: Reattach = NEW
) -> tuple[str, str, Generation]:
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompt = render_chat(
        body.messages,
        tokenizer,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    sampling = body.sampling(max_tokens=body.token_limit, logprobs=body.logprobs_count)
    await check_before_queueing(body.constraint, body.constraint_param)
    response_id = reattach.response_id("chatcmpl")
    [request] = build_requests(services, model, [prompt], sampling, response_id, constraint=body.constraint)
    [generation] = await start(services.engine.routed_by(chat_key(body, body.messages)), [request], reattach)
    return model.id, response_id, generation


def _header(response_id: str, model: str, obj: str) -> dict:
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": model}


async def _collect(body: ChatCompletionRequest, model: str, response_id: str, generation: Generation) -> dict:
    collected = await collect([generation], body.n)
    states = collected.choices
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": "".join(states[index].text)},
            "logprobs": chat_logprobs(states[index].logprobs) if body.logprobs else None,
            "finish_reason": states[index].finish_reason,
            "stop_reason": states[index].stop_reason,
        }
        for index in sorted(states)
    ]
    response = {
        **_header(response_id, model, "chat.completion"),
        "choices": choices,
        "usage": usage_body(collected.usages),
    }
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs_body(collected.prompt_logprobs.get(0))
    return response


async def _stream(
    body: ChatCompletionRequest, model: str, response_id: str, generation: Generation
) -> AsyncIterator[dict]:
    header = _header(response_id, model, "chat.completion.chunk")
    for index in range(body.n):
        yield {
            **header,
            "choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
    usage = Usage()
    async for _, event in merge([generation]):
        if event.kind == "end":
            usage = event.usage
            continue
        for delta in event.choices:
            choice = {
                "index": delta.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": chat_logprobs(delta.logprobs or []) if body.logprobs else None,
                "finish_reason": delta.finish_reason.value if delta.finish_reason else None,
            }
            if delta.finish_reason:
                choice["stop_reason"] = delta.stop_reason
            yield {**header, "choices": [choice]}
    if body.include_usage:
        yield {**header, "choices": [], "usage": usage_body([usage])}
