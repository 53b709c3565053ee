"""Bad input, by hand: each case gets a clear 4xx in the API's own error shape that says what is wrong (never a
500, never a hang), and the service still answers a normal request afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GOOD = {"model": TINY_MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "temperature": 0}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture
async def http(api) -> httpx.AsyncClient:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as client:
        yield client
        answer = await client.post(COMPLETIONS, json=GOOD)  # whatever the case did, the service still serves
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] == "length"


async def test_a_body_over_the_limit_is_413_whether_or_not_its_length_is_announced(http, base_settings) -> None:
    limit = base_settings.max_request_bytes
    huge = json.dumps({**GOOD, "prompt": "x" * (limit + 10)}).encode()
    error = error_of(await http.post(COMPLETIONS, content=huge, headers={"Content-Type": "application/json"}), 413)
    assert str(limit) in error["message"]

    async def chunked():  # no Content-Length: the size is only known while reading
        for start in range(0, len(huge), 1 << 20):
            yield huge[start : start + (1 << 20)]

    error = error_of(await http.post(COMPLETIONS, content=chunked(), headers={"Content-Type": "application/json"}), 413)
    assert str(limit) in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
)
async def test_deeply_nested_json_is_400(http, body) -> None:
    error_of(await http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"}), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**GOOD, "model": 5}, "model"),
        ({**GOOD, "prompt": {"text": "hi"}}, "prompt"),
        ({**GOOD, "max_tokens": "many"}, "max_tokens"),
        ({**GOOD, "stop": 7}, "stop"),
        ([GOOD], None),
        ("just a string", None),
    ],
)
async def test_ill_typed_json_is_400_naming_the_field(http, body, param) -> None:
    error = error_of(await http.post(COMPLETIONS, json=body), 400)
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


async def test_bodies_that_are_not_json_are_400(http) -> None:
    for content in (b'{"model": "\xff\xfe"}', b"", b"model=x&prompt=y", b'{"model": '):
        error_of(await http.post(COMPLETIONS, content=content, headers={"Content-Type": "application/json"}), 400)
    error_of(await http.post(COMPLETIONS, content=json.dumps(GOOD), headers={"Content-Type": "text/plain"}), 400)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
async def test_nan_and_infinite_numbers_are_400(http, field, literal) -> None:
    body = json.dumps(GOOD)[:-1] + f', "{field}": {literal}}}'
    error = error_of(await http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"}), 400)
    assert field in (error["param"] or "") + error["message"]


async def test_nan_inside_logit_bias_is_400(http) -> None:
    body = json.dumps(GOOD)[:-1] + ', "logit_bias": {"5": NaN}}'
    error_of(await http.post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"}), 400)


@pytest.mark.parametrize("max_tokens", [-1, 0, 10**30, 2**63])
async def test_negative_zero_or_enormous_max_tokens_is_400(http, max_tokens) -> None:
    error = error_of(await http.post(COMPLETIONS, json={**GOOD, "max_tokens": max_tokens}), 400)
    assert "max_tokens" in (error["param"] or "") + error["message"]


async def test_ten_thousand_stop_strings_are_400(http) -> None:
    error = error_of(await http.post(COMPLETIONS, json={**GOOD, "stop": [f"s{i}" for i in range(10_000)]}), 400)
    assert error["param"] == "stop"


@pytest.mark.parametrize("logit_bias", [{"5": 101}, {"5": -100.5}, {"five": 1}, {"-3": 1}, {"999999999": 1}])
async def test_logit_bias_out_of_range_is_400(http, logit_bias) -> None:
    error = error_of(await http.post(COMPLETIONS, json={**GOOD, "logit_bias": logit_bias}), 400)
    assert "logit_bias" in (error["param"] or "") + error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_token", 500),
        ("temprature", 1.5),
        ("logprob", 3),
        ("tools", [{"type": "function"}]),
        ("use_beam_search", True),
    ],
)
async def test_unknown_or_unsupported_fields_that_change_the_answer_are_rejected(http, field, value) -> None:
    error = error_of(await http.post(COMPLETIONS, json={**GOOD, field: value}), 400)
    assert field in error["message"]


async def test_harmless_fields_openai_clients_send_are_accepted(http) -> None:
    body = {**GOOD, "user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"}
    assert (await http.post(COMPLETIONS, json=body)).status_code == 200


async def test_a_prompt_far_over_the_context_is_400_with_the_numbers(http) -> None:
    error = error_of(await http.post(COMPLETIONS, json={**GOOD, "prompt": [5] * 100_000}), 400)
    assert error["code"] == "context_length_exceeded" and "100000" in error["message"]


async def test_chat_with_no_messages_or_bad_roles_is_400(http) -> None:
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"content": "no role"}], "hi"):
        error_of(await http.post(CHAT, json={"model": TINY_MODEL_NAME, "messages": messages}), 400)


async def test_websocket_garbage_frames_get_errors_and_the_socket_stays_usable(api) -> None:
    garbage: list[str | bytes] = [
        b"\x00\xff\xfe garbage",
        "not json",
        "[1, 2, 3]",
        '"a string"',
        b"\xc3\x28",
        json.dumps({"model": TINY_MODEL_NAME}),
        "{" * 50_000,
    ]
    url = api.base_url.replace("http://", "ws://") + COMPLETIONS
    async with websockets.connect(url, max_size=None) as ws:
        for frame in garbage:
            await ws.send(frame)
            error = json.loads(await ws.recv())
            assert set(error) == {"error"} and error["error"]["message"], error
            assert await ws.recv() == "[DONE]"
        await ws.send(json.dumps({**GOOD, "stream": True}))
        chunks = []
        while (message := await ws.recv()) != "[DONE]":
            chunks.append(json.loads(message))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
