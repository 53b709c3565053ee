"""The real clients against an auth-on server: the `openai` SDK, `aleph-alpha-client` and the `anthropic` SDK,
each with an API key and with a login token, and each told clearly when the credential is wrong."""

from __future__ import annotations

import asyncio

import aleph_alpha_client as aa
import anthropic
import openai
import pytest

from contracts.accounts import Role
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
PASSWORD = "sdk users have long passwords"


@pytest.fixture(scope="module")
async def credentials(accounts, make_key) -> dict[str, str]:
    await accounts.add_user("sdk@example.org", PASSWORD, Role.CLIENT)
    token, _ = await accounts.login("sdk@example.org", PASSWORD)
    return {"api key": await make_key(Role.CLIENT, limits=None), "login token": token}


@pytest.mark.parametrize("kind", ["api key", "login token"])
async def test_openai_sdk(api_on, credentials, kind) -> None:
    async with openai.AsyncOpenAI(base_url=f"{api_on.base_url}/v1", api_key=credentials[kind], max_retries=0) as sdk:
        assert [model.id async for model in sdk.models.list()] == [TINY_MODEL_NAME]
        chat = await sdk.chat.completions.create(
            model=TINY_MODEL_NAME, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
        )
        assert chat.usage.completion_tokens == 3
        raw = await sdk.completions.with_raw_response.create(model=TINY_MODEL_NAME, prompt="Hi", max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "60"  # the server's defaults apply


async def test_openai_sdk_with_a_wrong_key(api_on) -> None:
    async with openai.AsyncOpenAI(base_url=f"{api_on.base_url}/v1", api_key="sk-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.models.list()
    assert info.value.code == "invalid_api_key"


@pytest.mark.parametrize("kind", ["api key", "login token"])
async def test_aleph_alpha_client(api_on, credentials, kind) -> None:
    async with aa.AsyncClient(token=credentials[kind], host=api_on.base_url, total_retries=0) as client:
        await client.validate_version()
        tokens = await client.tokenize(
            aa.TokenizationRequest("Hello world", tokens=True, token_ids=True), model=TINY_MODEL_NAME
        )
        assert tokens.token_ids
        completion = await client.complete(
            aa.CompletionRequest(prompt=aa.Prompt.from_text("Hello"), maximum_tokens=2), model=TINY_MODEL_NAME
        )
        assert completion.num_tokens_generated == 2
    sync = aa.Client(token=credentials[kind], host=api_on.base_url, total_retries=0)
    assert [model["name"] for model in await asyncio.to_thread(sync.models)] == [TINY_MODEL_NAME]


async def test_aleph_alpha_client_with_a_wrong_token(api_on) -> None:
    async with aa.AsyncClient(token="wrong", host=api_on.base_url, total_retries=0) as client:
        with pytest.raises(PermissionError):  # the client's type for a 401
            await client.models()


@pytest.mark.parametrize("kind", ["api key", "login token"])
async def test_anthropic_sdk(api_on, credentials, kind) -> None:
    # `api_key` is sent as x-api-key (what Anthropic's SDKs use), `auth_token` as a bearer credential.
    for sdk in (
        anthropic.AsyncAnthropic(base_url=api_on.base_url, api_key=credentials[kind], max_retries=0),
        anthropic.AsyncAnthropic(base_url=api_on.base_url, auth_token=credentials[kind], max_retries=0),
    ):
        async with sdk:
            message = await sdk.messages.create(
                model=TINY_MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
            )
            assert message.usage.output_tokens == 2
            counted = await sdk.messages.count_tokens(
                model=TINY_MODEL_NAME, messages=[{"role": "user", "content": "Hi"}]
            )
            assert counted.input_tokens == message.usage.input_tokens


async def test_anthropic_sdk_with_a_wrong_key(api_on) -> None:
    async with anthropic.AsyncAnthropic(base_url=api_on.base_url, api_key="sk-ant-wrong", max_retries=0) as sdk:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await sdk.messages.create(model=TINY_MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 401
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "authentication_error"
    assert "x-api-key" in info.value.body["error"]["message"]
