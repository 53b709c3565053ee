"""Prefix caching through the real stack and the `openai` SDK (issue #18): a second request with the same long
prompt reports `usage.prompt_tokens_details.cached_tokens`, on completions and on streamed chat; another owner's
identical prompt reports none (the edge salts the cache with the key's owner); the Responses and Messages APIs report
cache reads in their own shapes; `/metrics` counts the lookups."""

from __future__ import annotations

import re
import uuid

import anthropic
import httpx
import openai
import pytest

from contracts.accounts import Role
from tests.integration.auth.conftest import headers
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


def _long_prompt() -> str:
    """Well over two 32-token blocks, and new to the worker's cache in every run."""
    words = " ".join(f"item{i} of the shared system prompt," for i in range(30))
    return f"{uuid.uuid4().hex} {words} answer briefly:"


async def test_cached_tokens_follow_the_owner(api_on, make_key, role_keys) -> None:
    prompt = _long_prompt()
    key_a, key_b = await make_key(name="cache owner a"), await make_key(name="cache owner b")
    url = f"{api_on.base_url}/v1"
    async with (
        openai.AsyncOpenAI(base_url=url, api_key=key_a, max_retries=0) as owner_a,
        openai.AsyncOpenAI(base_url=url, api_key=key_b, max_retries=0) as owner_b,
    ):

        async def completion_cached(sdk: openai.AsyncOpenAI) -> int:
            done = await sdk.completions.create(model=TINY_MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
            assert done.usage.prompt_tokens > 64
            return done.usage.prompt_tokens_details.cached_tokens

        assert await completion_cached(owner_a) == 0
        again = await completion_cached(owner_a)
        assert again > 0 and again % 32 == 0
        assert await completion_cached(owner_b) == 0  # the same prompt, another owner: nothing shared

        async def streamed_chat_cached(sdk: openai.AsyncOpenAI) -> int:
            stream = await sdk.chat.completions.create(
                model=TINY_MODEL_NAME,
                messages=[{"role": "system", "content": prompt}, {"role": "user", "content": "go"}],
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
            return usage[-1].prompt_tokens_details.cached_tokens

        assert await streamed_chat_cached(owner_b) == 0  # the chat template wraps the prompt: a new prefix
        assert await streamed_chat_cached(owner_b) > 0
        non_streamed = await owner_b.chat.completions.create(
            model=TINY_MODEL_NAME,
            messages=[{"role": "system", "content": prompt}, {"role": "user", "content": "go"}],
            max_tokens=2,
        )
        assert non_streamed.usage.prompt_tokens_details.cached_tokens > 0

        async def response_cached(sdk: openai.AsyncOpenAI) -> int:
            done = await sdk.responses.create(
                model=TINY_MODEL_NAME, instructions=prompt, input="go on", max_output_tokens=2, store=False
            )
            return done.usage.input_tokens_details.cached_tokens

        assert await response_cached(owner_a) == 0  # a new rendering of the prompt
        assert await response_cached(owner_a) > 0

    key_c = await make_key(name="cache owner c")  # whose cache holds nothing of this prompt yet
    async with anthropic.AsyncAnthropic(base_url=api_on.base_url, api_key=key_c, max_retries=0) as claude:

        async def message_usage() -> anthropic.types.Usage:
            reply = await claude.messages.create(
                model=TINY_MODEL_NAME, system=prompt, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            return reply.usage

        first, second = await message_usage(), await message_usage()
        assert first.cache_read_input_tokens == 0
        assert second.cache_read_input_tokens > 0  # Anthropic's shape: cache reads apart from fresh input
        assert second.input_tokens + second.cache_read_input_tokens == first.input_tokens

    async with httpx.AsyncClient(base_url=api_on.base_url, timeout=30) as client:
        metrics = (await client.get("/metrics", headers=headers(role_keys[Role.ADMIN]))).text
    hits = re.search(r"^inferq:prefix_cache_hits_total\{[^}]*\} (\S+)$", metrics, re.MULTILINE)
    queries = re.search(r"^inferq:prefix_cache_queries_total\{[^}]*\} (\S+)$", metrics, re.MULTILINE)
    assert hits and queries, metrics
    assert float(queries.group(1)) > float(hits.group(1)) > 0
