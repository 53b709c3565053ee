"""The edge renders chat templates without transformers (api/chat_template.py, api/fast_tokenizer.py) exactly as
transformers' `apply_chat_template` does: every chat template the repo has, plus one that uses every helper
transformers gives templates, across conversations with system/user/assistant turns, tool calls and results,
tools lists, documents, add_generation_prompt on and off and continue_final_message; the same text, the same
token ids, the same refusals. transformers is the oracle here (the test process may import it; the api may not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.errors import ApiError
from api.fast_tokenizer import FastTokenizer
from api.schemas.openai import ChatMessage
from api.serving.chat import render_chat
from api.tools.definitions import FunctionTool
from api.tools.plan import plan_tools
from engine_worker.sim import CHAT_TEMPLATE as SIM_TEMPLATE
from tests.tool_templates import HERMES_TEMPLATE

# Every construct transformers' template environment offers: named special tokens, `tojson` with its options
# (no HTML escaping, non-ASCII kept), `raise_exception`, `strftime_now`, `namespace`, `dict`, loop controls,
# `{% generation %}`, `documents`, reasoning aliases, content parts; indented block tags and newlines after them
# exercise trim_blocks / lstrip_blocks.
HELPERS_TEMPLATE = """
{%- set ns = namespace(turns=0, tool_turns=0) -%}
{{- bos_token -}}
{% if tools is not none %}
    [TOOLS]{{ tools | tojson }}
    {{ tools | tojson(indent=2) }}
    {{ tools | tojson(separators=(',', ':'), sort_keys=true) }}[/TOOLS]
{% endif %}
{% if documents %}
    {% for doc in documents %}<doc title="{{ doc.title }}">{{ doc.text }}</doc>{% endfor %}
{% endif %}
{% for message in messages %}
    {% if message.role not in ['system', 'developer', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('unknown role: ' + message.role) }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    <{{ message.role }}>
    {%- if message.reasoning_content is defined %}
        <think>{{ message.reasoning_content }}|{{ message.thinking }}</think>
    {%- endif %}
    {%- if message.content is string %}{{ message.content }}
    {%- elif message.content is defined %}
        {%- for part in message.content %}{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}
    {%- endif %}
    {% for call in message.tool_calls | default([]) %}
        {% if loop.index > 2 %}{% break %}{% endif %}
        {% if call.function.name == 'skip_me' %}{% continue %}{% endif %}
        <call id="{{ call.id }}">{{ call.function | tojson }}</call>
    {% endfor %}
    {% if message.role == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}
    {% if message.role == 'tool' %}{% set ns.tool_turns = ns.tool_turns + 1 %}{% endif %}
    </{{ message.role }}>
{% endfor %}
{{- dict(turns=ns.turns, tools=ns.tool_turns, pad=pad_token) | tojson }}{{ dict.fromkeys(['a', 'b'], 0) | tojson }}
{%- if add_generation_prompt %}<assistant>{% endif %}
{{- strftime_now('%Y') -}}
"""

# Fragments of real models' tool formats (tests/api/tools/test_tools.py): small, but real tool-use constructs.
QWEN_FRAGMENT = (
    "{%- if tools %}<tools>{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}</tools>{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls | default([]) %}<tool_call>{{ call.function | tojson }}</tool_call>"
    "{%- endfor %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
MISTRAL_FRAGMENT = (
    "{{ bos_token }}{%- if tools is not none %}[AVAILABLE_TOOLS] {{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls is defined %}[TOOL_CALLS] {{ m.tool_calls|tojson }}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS] {{ m.content }}[/TOOL_RESULTS]"
    "{%- else %}{{ m.content }}{{ eos_token }}{%- endif %}{%- endfor %}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Wetter & <Temperatur> in einer Stadt — 'heute'",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CALL_2 = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Grüße, wie geht's? 👋 <b>&amp;</b>"}],
    "system_user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a  joke.\n\n  With spaces. "},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Oslo, and the time?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL_2]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ],
    "tool_then_answer": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"},
        {"role": "assistant", "content": "It is 4 degrees and raining."},
        {"role": "user", "content": "Thanks"},
    ],
    "reasoning_and_parts": [
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": "Answer: ", "reasoning": "Let me think."},
    ],
    "prefilled_assistant": [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, "},
    ],
}
DOCUMENTS = [{"title": "Oslo", "text": "Capital of Norway."}, {"title": "Bergen", "text": "Rainy."}]


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer_dir: Path):
    """Ours and transformers', from the same directory (the real SmolLM2 tokenizer: its special tokens)."""
    from transformers import AutoTokenizer

    return FastTokenizer.from_directory(smollm2_tokenizer_dir), AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def templates(smollm2_tokenizer_dir: Path) -> dict[str, str]:
    return {
        "smollm2": (smollm2_tokenizer_dir / "chat_template.jinja").read_text(),
        "sim": SIM_TEMPLATE,
        "hermes": HERMES_TEMPLATE,
        "qwen_fragment": QWEN_FRAGMENT,
        "mistral_fragment": MISTRAL_FRAGMENT,
        "helpers": HELPERS_TEMPLATE,
    }


def _both(tokenizers, template: str, messages, **options):
    """(ours, transformers') rendering, or the exception each raised."""
    results = []
    for tokenizer in tokenizers:
        try:
            results.append(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **options))
        except Exception as exc:  # noqa: BLE001 - the refusals are compared too
            results.append(exc)
    return results


OPTIONS = {
    "generation_prompt": {"add_generation_prompt": True},
    "no_generation_prompt": {"add_generation_prompt": False},
    "tools": {"add_generation_prompt": True, "tools": [WEATHER, TIME]},
    "tools_and_documents": {"add_generation_prompt": False, "tools": [WEATHER], "documents": DOCUMENTS},
    "continue_final": {"continue_final_message": True},
}


@pytest.mark.parametrize("template_name", ["smollm2", "sim", "hermes", "qwen_fragment", "mistral_fragment", "helpers"])
def test_every_template_renders_and_tokenizes_as_transformers(tokenizers, templates, template_name: str) -> None:
    template, compared = templates[template_name], 0
    for conversation_name, messages in CONVERSATIONS.items():
        for option_name, options in OPTIONS.items():
            ours, theirs = _both(tokenizers, template, messages, **options)
            where = f"{template_name} / {conversation_name} / {option_name}"
            if isinstance(theirs, Exception):
                assert isinstance(ours, Exception), f"{where}: transformers refused ({theirs!r}), we rendered"
                continue
            assert ours == theirs, where
            ids = [tokenizer.encode(ours, add_special_tokens=False) for tokenizer in tokenizers]
            assert ids[0] == ids[1], where
            compared += 1
    assert compared >= len(CONVERSATIONS) * 3  # most combinations render (the refusals are the exception)


def test_the_helpers_template_really_uses_the_helpers(tokenizers, templates) -> None:
    """Guards the test above: the helpers template renders what it is meant to exercise."""
    ours = tokenizers[0].apply_chat_template(
        CONVERSATIONS["tool_round_trip"],
        chat_template=templates["helpers"],
        tools=[WEATHER],
        documents=DOCUMENTS,
        add_generation_prompt=True,
    )
    assert ours.startswith("<|im_start|>    [TOOLS]")  # bos_token; trim_blocks: no newline after the if
    assert '[/TOOLS]\n<doc title="Oslo">' in ours  # lstrip_blocks: the indent before `{% for %}` is gone
    assert "Wetter & <Temperatur> in einer Stadt — 'heute'" in ours  # tojson: neither HTML- nor ASCII-escaped
    assert '\n  {\n    "type": "function",' in ours  # tojson(indent=2)
    assert '{"function":{"description":' in ours  # separators and sort_keys
    assert '<doc title="Oslo">' in ours and '<call id="call_2">' in ours
    reasoning = tokenizers[0].apply_chat_template(
        CONVERSATIONS["reasoning_and_parts"], chat_template=templates["helpers"]
    )
    assert "Part one. Part two." in reasoning and "<think>Let me think.|Let me think.</think>Answer: " in reasoning
    assert '{"turns": 4, "tools": 2, "pad": "<|im_end|>"}{"a": 0, "b": 0}<assistant>' in ours


REFUSED = {
    "raise_exception": ("helpers", [{"role": "narrator", "content": "x"}], "unknown role: narrator"),
    "underscore_namespace": ("{% set ns = namespace(_secret=1) %}{{ ns }}", [{"role": "user", "content": "x"}], ""),
    "sandbox_mutation": ("{{ messages.append(1) }}", [{"role": "user", "content": "x"}], ""),
    "sandbox_dunder": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}], ""),
    "undeleted_final_message": ("{{ 'dropped' }}", CONVERSATIONS["prefilled_assistant"], ""),
    "empty_conversation": ("{{ messages }}", [], ""),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_transformers_refuses_we_refuse(tokenizers, templates, case: str) -> None:
    template, messages, message = REFUSED[case]
    options = {"continue_final_message": True} if case == "undeleted_final_message" else {}
    ours, theirs = _both(tokenizers, templates.get(template, template), messages, **options)
    assert isinstance(theirs, Exception) and isinstance(ours, Exception), (ours, theirs)
    assert message in str(ours) and message in str(theirs)


def test_named_templates_pick_tool_use_when_tools_are_given(tokenizers) -> None:
    named = {"default": "default:{{ messages[0].content }}", "tool_use": "tools:{{ tools | length if tools else 0 }}"}
    messages = CONVERSATIONS["user"]
    saved = [tokenizer.chat_template for tokenizer in tokenizers]
    try:
        for tokenizer in tokenizers:
            tokenizer.chat_template = named
        for options in ({}, {"tools": [WEATHER]}, {"chat_template": "tool_use"}, {"chat_template": "{{ 'own' }}"}):
            ours, theirs = (
                tokenizer.apply_chat_template(messages, tokenize=False, **options) for tokenizer in tokenizers
            )
            assert ours == theirs, options
    finally:
        for tokenizer, template in zip(tokenizers, saved, strict=True):
            tokenizer.chat_template = template


def _request_messages(messages: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate({k: v for k, v in m.items() if v is not None}) for m in messages]


@pytest.mark.parametrize("template_name", ["smollm2", "hermes", "helpers"])
def test_the_edge_path_gives_the_same_prompt_ids(tokenizers, templates, template_name: str) -> None:
    """`render_chat` as the chat, messages and responses surfaces call it (the tool plan's messages and
    kwargs, add_generation_prompt, continue_final_message, add_special_tokens), with each tokenizer."""
    tools = [FunctionTool.model_validate(tool) for tool in (WEATHER, TIME)]
    saved = [tokenizer.chat_template for tokenizer in tokenizers]
    try:
        for tokenizer in tokenizers:
            tokenizer.chat_template = templates[template_name]
        for conversation_name, raw in CONVERSATIONS.items():
            messages = _request_messages(raw)
            for tool_list in (None, tools):
                plan = plan_tools(tool_list, None, chat_template=templates[template_name])
                for options in (
                    {"add_generation_prompt": True},
                    {"add_generation_prompt": False, "add_special_tokens": True},
                    {"continue_final_message": True},
                ):
                    results = []
                    for tokenizer in tokenizers:
                        try:
                            results.append(render_chat(messages, tokenizer, tools=plan, **options))
                        except ApiError as exc:
                            results.append((exc.info.code, exc.info.param))
                    assert results[0] == results[1], f"{template_name} / {conversation_name} / {options}"
    finally:
        for tokenizer, template in zip(tokenizers, saved, strict=True):
            tokenizer.chat_template = template


def test_the_rendered_tools_are_the_json_transformers_writes(tokenizers, templates) -> None:
    """tojson of the tools in the Hermes template: the exact bytes a model trained on transformers' prompts saw."""
    ours = tokenizers[0].apply_chat_template(
        CONVERSATIONS["user"], chat_template=templates["hermes"], tools=[WEATHER], add_generation_prompt=True
    )
    assert json.dumps(WEATHER, ensure_ascii=False) in ours
