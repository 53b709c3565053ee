"""`POST /v1/chat/completions`: messages → the model's chat template → queue request → OpenAI chat shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request

from api.engine_client import Generation, merge
from api.errors import ApiError
from api.schemas.openai import ChatCompletionRequest
from api.services import Services
from api.serving.generation import (
    ChoiceState,
    build_requests,
    chat_logprobs,
    new_id,
    prompt_logprobs_body,
    until_disconnected,
    usage_body,
)
from api.streaming import sse_response
from contracts import ErrorCode, Usage


def render_chat(body: ChatCompletionRequest, tokenizer) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(ErrorCode.INVALID_REQUEST, "this model has no chat template; use /v1/completions",
                       param="messages")
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    continue_final = body.continue_final_message
    if continue_final and body.messages[-1].role != "assistant":
        raise ApiError(ErrorCode.INVALID_REQUEST, "continue_final_message needs a final assistant message",
                       param="continue_final_message")
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=body.add_generation_prompt and not continue_final,
            continue_final_message=continue_final, return_dict=False)
    except Exception as exc:  # template errors (e.g. role order a template forbids) are the client's input
        raise ApiError(ErrorCode.INVALID_REQUEST, f"the chat template rejected the messages: {exc}",
                       param="messages") from exc
    return list(rendered)


async def create_chat_completion(body: ChatCompletionRequest, services: Services, http: Request):
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    prompt = render_chat(body, tokenizer)
    sampling = body.sampling(max_tokens=body.token_limit, logprobs=body.logprobs_count)
    response_id = new_id("chatcmpl")
    [request] = build_requests(services, model, [prompt], sampling, response_id)
    generation = await services.engine.submit(request)
    if body.stream:
        return sse_response(_stream(body, model.id, response_id, generation))
    return await until_disconnected(http, _collect(body, model.id, response_id, generation))


def _header(response_id: str, model: str, obj: str) -> dict:
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": model}


async def _collect(body: ChatCompletionRequest, model: str, response_id: str, generation: Generation) -> dict:
    states: dict[int, ChoiceState] = {}
    usage = Usage()
    prompt_logprobs = None
    async for _, event in merge([generation]):
        if event.kind == "end":
            usage = event.usage
            continue
        prompt_logprobs = event.prompt_logprobs or prompt_logprobs
        for delta in event.choices:
            states.setdefault(delta.index, ChoiceState(delta.index)).add(delta)
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
    response = {**_header(response_id, model, "chat.completion"), "choices": choices, "usage": usage_body([usage])}
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs_body(prompt_logprobs)
    return response


async def _stream(body: ChatCompletionRequest, model: str, response_id: str,
                  generation: Generation) -> AsyncIterator[dict]:
    header = _header(response_id, model, "chat.completion.chunk")
    for index in range(body.n):
        yield {**header, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]}
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
