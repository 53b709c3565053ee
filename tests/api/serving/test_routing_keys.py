"""The affinity keys of the agent surfaces (api/affinity.py, docs/routing.md): a Responses request and an Anthropic
Messages request are routed by the client's key if it gave one, else by their conversation's opening, so every turn
of one conversation (a previous_response_id chain, a Messages tool loop) keys the same and another conversation
does not."""

from __future__ import annotations

from typing import Any

from api.schemas.anthropic import MessagesRequest
from api.schemas.responses import ResponseRequest
from api.serving import messages, responses
from api.serving.response_events import new_response
from api.serving.response_items import normalise_input
from contracts.responses import StoredResponse

INSTRUCTIONS = "You are a weather agent. Use the tools."
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "21 degrees"}
ANSWER = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 21."}]}


def stored(previous: StoredResponse | None = None, output: list[dict] | None = None, **fields: Any) -> StoredResponse:
    """A response record as `create_response` builds it (before it runs), with `output` as if it had run."""
    body = ResponseRequest(model="m", instructions=INSTRUCTIONS, **fields)
    history = previous.conversation() if previous else []
    response = new_response("resp_1", "m", body.echoed(), status="completed")
    response["output"] = normalise_input(output or [], [*history, *normalise_input(body.input, history)])
    return StoredResponse(
        id="resp_1", owner="o", input_items=normalise_input(body.input, history), history=history, response=response
    )


def test_a_previous_response_id_chain_keys_like_its_first_turn() -> None:
    first = stored(input="Weather in Oslo?", output=[CALL])
    second = stored(first, input=[OUTPUT], output=[ANSWER])
    third = stored(second, input="And tomorrow?")
    key = responses.routing_key(first)
    assert key.startswith("chat:") and "Weather in Oslo?" in key and INSTRUCTIONS in key
    assert responses.routing_key(second) == responses.routing_key(third) == key
    # A client that sends the whole conversation each turn (no previous_response_id) keys the same.
    assert responses.routing_key(stored(input=[{"role": "user", "content": "Weather in Oslo?"}, CALL, OUTPUT])) == key
    # Another first question under the same instructions is another conversation.
    assert responses.routing_key(stored(input="Weather in Rome?")) != key


def test_a_responses_client_key_comes_first() -> None:
    """prompt_cache_key, else user, else safety_identifier; and they are echoed, so a background response's runner
    reads them from the stored record."""
    given = {"prompt_cache_key": "conv-7", "user": "u1", "safety_identifier": "s1"}
    assert responses.routing_key(stored(input="q", **given)) == "cache_key:conv-7"
    assert responses.routing_key(stored(input="q", user="u1", safety_identifier="s1")) == "user:u1"
    assert responses.routing_key(stored(input="q", safety_identifier="s1")) == "user:s1"
    record = stored(input="q", **given)
    assert {name: record.response[name] for name in given} == given


def message_request(conversation: list[dict], **fields: Any) -> MessagesRequest:
    return MessagesRequest(model="m", max_tokens=8, system="Be a weather agent.", messages=conversation, **fields)


def test_a_messages_tool_loop_keys_like_its_first_turn() -> None:
    question = {"role": "user", "content": "Weather in Oslo?"}
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 degrees"}
    turns = [
        [question],
        [question, {"role": "assistant", "content": [tool_use]}, {"role": "user", "content": [result]}],
        [
            question,
            {"role": "assistant", "content": [tool_use]},
            {"role": "user", "content": [result]},
            {"role": "assistant", "content": "It is 21."},
            {"role": "user", "content": "And tomorrow?"},
        ],
    ]
    keys = {messages.routing_key(message_request(turn)) for turn in turns}
    assert len(keys) == 1
    [key] = keys
    assert "Be a weather agent." in key and "Weather in Oslo?" in key
    # The system prompt as text blocks is the same opening; another first question is not.
    blocks = MessagesRequest(
        model="m", max_tokens=8, system=[{"type": "text", "text": "Be a weather agent."}], messages=[question]
    )
    assert messages.routing_key(blocks) == key
    assert messages.routing_key(message_request([{"role": "user", "content": "Weather in Rome?"}])) != key


def test_a_messages_user_id_comes_first() -> None:
    conversation = [{"role": "user", "content": "hi"}]
    assert messages.routing_key(message_request(conversation, metadata={"user_id": "u-42"})) == "user:u-42"
    assert messages.routing_key(message_request(conversation, metadata={})).startswith("chat:")
