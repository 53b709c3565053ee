"""`POST /v1/chat/completions`: messages → the model's chat template → queue request → OpenAI chat shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.requests import Request

from api.affinity import conversation_key, explicit_key
from api.auth.caller import get_caller
from api.engine_client import Generation, merge
from api.errors import ApiError
from api.schemas.openai import ChatCompletionRequest, ChatMessage
from api.services import Services
from api.serving.completion_parts import (
    build_requests,
    chat_logprobs,
    collect,
    prompt_logprobs_body,
    until_disconnected,
    usage_body,
)
from api.serving.reattach import NEW, Reattach, reattach_from, start
from api.streaming import sse_response
from api.tools.plan import AssistantReply, ToolPlan, plan_tools, tool_finish_reason
from contracts import ErrorCode, Usage


def render_chat(
    messages: Sequence[ChatMessage],
    tokenizer,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    tools: ToolPlan | None = None,
) -> list[int]:
    """The model's chat template applied to the messages, as token ids (shared by chat and /tokenize). `tools`:
    the request's tool plan (api/tools/plan.py); without one, tool calls and results in the conversation are still
    rendered in the template's terms."""
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
    plan = tools if tools is not None else plan_tools(None, None, chat_template=tokenizer.chat_template)
    template_messages = plan.template_messages([message.template_dict() for message in messages])
    try:
        rendered = tokenizer.apply_chat_template(
            template_messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **plan.template_kwargs(),
        )
    except Exception as exc:  # template errors (e.g. role order a template forbids) are the client's input
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    # The template writes its own special tokens; vLLM's add_special_tokens (default off) adds the tokenizer's.
    return tokenizer.encode(rendered, add_special_tokens=add_special_tokens)


async def create_chat_completion(body: ChatCompletionRequest, services: Services, http: Request):
    reattach = reattach_from(http.headers, "chatcmpl", get_caller(http).owner)
    submitted = await _submit(body, services, reattach)
    if body.stream:
        return sse_response(
            _stream(body, submitted), event_ids=reattach.event_ids(submitted.response_id, generations=1)
        )
    return await until_disconnected(http, _collect(body, submitted))


async def chat_completion_response(body: ChatCompletionRequest, services: Services) -> dict:
    """The non-streaming response body, without an HTTP request (the batch runner runs each line this way)."""
    return await _collect(body, await _submit(body, services))


async def chat_completion_chunks(body: ChatCompletionRequest, services: Services) -> AsyncIterator[dict]:
    """Submit the request; the chunk objects of its stream (framed as SSE events or WebSocket messages)."""
    return _stream(body, await _submit(body, services))


@dataclass(frozen=True, slots=True)
class _Submitted:
    model: str
    response_id: str
    generation: Generation
    tools: ToolPlan


async def _submit(body: ChatCompletionRequest, services: Services, reattach: Reattach = NEW) -> _Submitted:
    model = await services.catalog.get(body.model)
    tokenizer = await services.catalog.tokenizer(model)
    tools = plan_tools(
        body.tools,
        body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        chat_template=getattr(tokenizer, "chat_template", None),
        response_constraint=body.constraint,
        response_param=body.constraint_param,
    )
    prompt = render_chat(
        body.messages,
        tokenizer,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=tools,
    )
    sampling = body.sampling(max_tokens=body.token_limit, logprobs=body.logprobs_count)
    # The tools' schemas and the constraint (the tools' own or the client's) compile:
    await tools.check(services.structured_validation)
    response_id = reattach.response_id("chatcmpl")
    [request] = build_requests(services, model, [prompt], sampling, response_id, constraint=tools.constraint)
    engine = services.engine.routed_by(conversation_key(body.messages, explicit_key(body)))
    [generation] = await start(engine, [request], reattach)
    return _Submitted(model.id, response_id, generation, tools)


def _header(response_id: str, model: str, obj: str) -> dict:
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": model}


def _message(reply: AssistantReply) -> dict:
    message: dict = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return message


async def _collect(body: ChatCompletionRequest, submitted: _Submitted) -> dict:
    collected = await collect([submitted.generation], body.n)
    states = collected.choices
    choices = []
    for index in sorted(states):
        state = states[index]
        reply = submitted.tools.reply("".join(state.text), submitted.response_id, index, state.finish_reason)
        choices.append(
            {
                "index": index,
                "message": _message(reply),
                "logprobs": chat_logprobs(state.logprobs) if body.logprobs else None,
                "finish_reason": reply.finish_reason,
                "stop_reason": state.stop_reason,
            }
        )
    response = {
        **_header(submitted.response_id, submitted.model, "chat.completion"),
        "choices": choices,
        "usage": usage_body(collected.usages),
    }
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs_body(collected.prompt_logprobs.get(0))
    return response


async def _stream(body: ChatCompletionRequest, submitted: _Submitted) -> AsyncIterator[dict]:
    header = _header(submitted.response_id, submitted.model, "chat.completion.chunk")
    readers = {index: submitted.tools.stream(submitted.response_id, index) for index in range(body.n)}
    texts = dict.fromkeys(range(body.n), "")
    for index in range(body.n):
        yield {
            **header,
            "choices": [
                {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            ],
        }
    usage = Usage()
    async for _, event in merge([submitted.generation]):
        if event.kind == "end":
            usage = event.usage
            continue
        for delta in event.choices:
            finish_reason = delta.finish_reason.value if delta.finish_reason else None
            reader = readers[delta.index]
            if reader is None:
                body_delta = {"content": delta.text} if delta.text else {}
            else:
                # Tools: what the text so far adds, read in the answer's format (a pure function of the text).
                texts[delta.index] += delta.text
                read = (reader.finish if finish_reason else reader.feed)(texts[delta.index])
                body_delta = {"content": read.content} if read.content else {}
                if read.tool_calls:
                    body_delta["tool_calls"] = read.tool_calls
                finish_reason = tool_finish_reason(finish_reason, bool(reader.calls))
            choice = {
                "index": delta.index,
                "delta": body_delta,
                "logprobs": chat_logprobs(delta.logprobs or []) if body.logprobs else None,
                "finish_reason": finish_reason,
            }
            if delta.finish_reason:
                choice["stop_reason"] = delta.stop_reason
            yield {**header, "choices": [choice]}
    if body.include_usage:
        yield {**header, "choices": [], "usage": usage_body([usage])}
