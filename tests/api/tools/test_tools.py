"""Tool calling building blocks (api/tools): forced-call constraints, the models' formats, streaming deltas that
reassemble to the final calls, template detection."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from api.structured import validate_constraint
from api.tools.definitions import (
    FunctionTool,
    NamedToolChoice,
    ToolChoice,
    ToolChoiceError,
    call_constraint,
    generic_tools_prompt,
)
from api.tools.formats import ParsedOutput, ToolCall, ToolFormat, parse_tool_calls
from api.tools.streaming import ToolCallStream, tool_call_id
from api.tools.templates import detect_format, template_supports_tools

jsonschema_rs = pytest.importorskip("jsonschema_rs")

WEATHER = FunctionTool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
)
TIME = FunctionTool.model_validate({"type": "function", "function": {"name": "get_time"}})  # no parameters


# --- forced calls -------------------------------------------------------------------------------------------------
def _valid(constraint, document) -> bool:
    return jsonschema_rs.validator_for(constraint.json_schema).is_valid(document)


def test_required_forces_one_call_of_any_tool() -> None:
    constraint = call_constraint([WEATHER, TIME], "required", parallel_tool_calls=False)
    validate_constraint(constraint)
    assert constraint.strict  # get_weather is strict
    assert _valid(constraint, {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}})
    assert _valid(constraint, {"tool_call": {"name": "get_time", "arguments": {}}})
    assert not _valid(constraint, {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}})
    assert not _valid(constraint, {"tool_call": {"name": "launch", "arguments": {}}})
    assert not _valid(constraint, {"response": "hello"})  # required: no way out


def test_parallel_calls_are_a_non_empty_list() -> None:
    constraint = call_constraint([WEATHER, TIME], "required", parallel_tool_calls=True)
    validate_constraint(constraint)
    call = {"name": "get_time", "arguments": {}}
    assert _valid(constraint, {"tool_calls": [call, call]})
    assert not _valid(constraint, {"tool_calls": []})


def test_a_named_choice_forces_that_function() -> None:
    constraint = call_constraint(
        [WEATHER, TIME],
        NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}}),
        parallel_tool_calls=False,
    )
    assert not constraint.strict  # get_time is not strict
    assert _valid(constraint, {"tool_call": {"name": "get_time", "arguments": {}}})
    assert not _valid(constraint, {"tool_call": {"name": "get_weather", "arguments": {"city": "x", "unit": "c"}}})


def test_auto_is_constrained_only_for_the_generic_format() -> None:
    constraint = call_constraint([WEATHER], "auto", parallel_tool_calls=False)
    validate_constraint(constraint)
    assert _valid(constraint, {"response": "It is sunny."})
    assert _valid(constraint, {"tool_call": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}})
    assert call_constraint([WEATHER], "auto", tool_format=ToolFormat.HERMES) is None
    assert call_constraint([WEATHER], "none") is None
    # required is forced whatever the model's own format
    assert call_constraint([WEATHER], "required", tool_format=ToolFormat.HERMES) is not None


def test_bad_tool_choices_are_named() -> None:
    with pytest.raises(ToolChoiceError, match="'launch', which is not among the tools \\(get_weather, get_time\\)"):
        call_constraint([WEATHER, TIME], NamedToolChoice.model_validate({"function": {"name": "launch"}}))
    with pytest.raises(ToolChoiceError, match="requires tools"):
        call_constraint([], "required")
    with pytest.raises(ValueError):
        FunctionTool.model_validate({"type": "function", "function": {"name": "has space"}})


def test_tool_choice_and_tools_parse_in_the_openai_shape() -> None:
    adapter = TypeAdapter(ToolChoice)
    assert adapter.validate_python("required") == "required"
    named = adapter.validate_python({"type": "function", "function": {"name": "get_time"}})
    assert isinstance(named, NamedToolChoice) and named.function.name == "get_time"
    with pytest.raises(ValidationError):
        adapter.validate_python("sometimes")
    with pytest.raises(ValidationError):  # unknown fields of a tool are refused, not dropped
        FunctionTool.model_validate({"type": "function", "function": {"name": "f", "paramters": {}}})


def test_the_generic_prompt_lists_the_tools_and_the_answer_shape() -> None:
    prompt = generic_tools_prompt([WEATHER, TIME], "auto", parallel_tool_calls=False)
    assert '"name": "get_weather"' in prompt and '"get_time"' in prompt
    assert '{"tool_call": ' in prompt and '{"response": ' in prompt
    forced = generic_tools_prompt([WEATHER, TIME], NamedToolChoice.model_validate({"function": {"name": "get_time"}}))
    assert "get_weather" not in forced and '"response"' not in forced and '{"tool_calls": [' in forced


def test_a_forced_call_sampled_under_its_mask_always_parses(smollm2_tokenizer_dir: Path) -> None:
    """The whole path without a model: the grammar from call_constraint, random tokens under its mask, then the
    generic parser: every walk is one call of a listed tool with valid arguments."""
    import numpy as np
    from transformers import AutoTokenizer

    from engine_worker.constraints import GrammarCompiler, allocate_bitmask, unpack_bitmask

    compiler = GrammarCompiler.from_hf_tokenizer(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir))
    constraint = call_constraint([WEATHER, TIME], "required", parallel_tool_calls=True)
    eos = compiler.eos_token_ids
    for seed in range(5):
        rng, matcher, tokens = random.Random(seed), compiler.matcher(constraint), []
        mask = allocate_bitmask(1, compiler.vocab_size)
        while True:
            matcher.fill_bitmask(mask[0])
            token = int(rng.choice(np.flatnonzero(unpack_bitmask(mask, compiler.vocab_size)[0])))
            matcher.consume([token])
            if token in eos:
                break
            tokens.append(token)
            assert len(tokens) < 500
        parsed = parse_tool_calls(compiler.tokenizer.decode_str(tokens), ToolFormat.GENERIC)
        assert parsed.content is None and parsed.tool_calls
        for call in parsed.tool_calls:
            tool = {"get_weather": WEATHER, "get_time": TIME}[call.name]
            schema = tool.function.parameters or {"type": "object", "maxProperties": 0}
            assert jsonschema_rs.validator_for(schema).is_valid(json.loads(call.arguments))


# --- formats ------------------------------------------------------------------------------------------------------
WEATHER_ARGS = '{"city": "Paris", "unit": "c"}'
OUTPUTS = {
    "hermes_two_calls": (
        ToolFormat.HERMES,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        + WEATHER_ARGS
        + '}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        ParsedOutput("Let me check.", (ToolCall("get_weather", WEATHER_ARGS), ToolCall("get_time", "{}"))),
    ),
    "hermes_plain": (ToolFormat.HERMES, "Paris is sunny <b>today</b>.", ParsedOutput("Paris is sunny <b>today</b>.")),
    "hermes_arguments_first": (
        ToolFormat.HERMES,
        '<tool_call>{"arguments": {"a": [1, "}"]}, "name": "f"}</tool_call>',
        ParsedOutput(None, (ToolCall("f", '{"a": [1, "}"]}'),)),
    ),
    "hermes_string_arguments": (
        ToolFormat.HERMES,
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        ParsedOutput(None, (ToolCall("f", '{"a": 1}'),)),
    ),
    "llama3": (
        ToolFormat.LLAMA3_JSON,
        '{"name": "get_weather", "parameters": ' + WEATHER_ARGS + "}",
        ParsedOutput(None, (ToolCall("get_weather", WEATHER_ARGS),)),
    ),
    "llama3_python_tag_two": (
        ToolFormat.LLAMA3_JSON,
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}',
        ParsedOutput(None, (ToolCall("a", "{}"), ToolCall("b", '{"x": 1}'))),
    ),
    "llama3_plain": (ToolFormat.LLAMA3_JSON, "The weather is fine.", ParsedOutput("The weather is fine.")),
    "mistral": (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + WEATHER_ARGS + "}]",
        ParsedOutput(None, (ToolCall("get_weather", WEATHER_ARGS),)),
    ),
    "mistral_content_first": (
        ToolFormat.MISTRAL,
        'Checking.[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": "é\\n"}}]',
        ParsedOutput("Checking.", (ToolCall("a", "{}"), ToolCall("b", '{"q": "é\\n"}'))),
    ),
    "generic_call": (
        ToolFormat.GENERIC,
        '{"tool_call": {"name": "get_weather", "arguments": ' + WEATHER_ARGS + "}}",
        ParsedOutput(None, (ToolCall("get_weather", WEATHER_ARGS),)),
    ),
    "generic_calls": (
        ToolFormat.GENERIC,
        '{"tool_calls":[{"name":"a","arguments":{}},{"name":"b","arguments":{}}]}',
        ParsedOutput(None, (ToolCall("a", "{}"), ToolCall("b", "{}"))),
    ),
    "generic_response": (ToolFormat.GENERIC, '{"response": "Hi \\"there\\"\\n\\u00e9"}', ParsedOutput('Hi "there"\né')),
    # A direct answer in the client's JSON output format is the value's own text (pretty-printing kept).
    "generic_json_response": (
        ToolFormat.GENERIC,
        '{"response": {"city": "Oslo",\n  "temps": [1, 2.5]} \n}',
        ParsedOutput('{"city": "Oslo",\n  "temps": [1, 2.5]}'),
    ),
    "generic_number_response": (ToolFormat.GENERIC, '{"response": 12 }', ParsedOutput("12")),
}
MALFORMED = {
    "hermes_cut_by_max_tokens": (ToolFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'),
    "hermes_broken_json": (ToolFormat.HERMES, '<tool_call>{"name": "f", "arguments": {"a": 1}]</tool_call>'),
    "hermes_no_close_tag": (ToolFormat.HERMES, '<tool_call>{"name": "f", "arguments": {}} and more'),
    "hermes_name_not_string": (ToolFormat.HERMES, '<tool_call>{"name": 3, "arguments": {}}</tool_call>'),
    "hermes_no_name": (ToolFormat.HERMES, '<tool_call>{"arguments": {}}</tool_call>'),
    "llama3_trailing_text": (ToolFormat.LLAMA3_JSON, '{"name": "a", "parameters": {}} that was the call'),
    "mistral_not_a_list": (ToolFormat.MISTRAL, '[TOOL_CALLS] {"name": "a", "arguments": {}}'),
    "generic_two_keys": (ToolFormat.GENERIC, '{"response": "a", "tool_call": {"name": "a", "arguments": {}}}'),
    "generic_cut": (ToolFormat.GENERIC, '{"tool_calls": [{"name": "a", "arguments": {}}'),
    "generic_not_json": (ToolFormat.GENERIC, "Hello!"),
}


@pytest.mark.parametrize(("tool_format", "text", "expected"), OUTPUTS.values(), ids=OUTPUTS.keys())
def test_realistic_outputs_parse_to_their_calls(tool_format: ToolFormat, text: str, expected: ParsedOutput) -> None:
    parsed = parse_tool_calls(text, tool_format)
    assert parsed == expected
    for call in parsed.tool_calls:
        json.loads(call.arguments)


@pytest.mark.parametrize(("tool_format", "text"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_outputs_come_back_as_content(tool_format: ToolFormat, text: str) -> None:
    assert parse_tool_calls(text, tool_format) == ParsedOutput(text)


# --- streaming ----------------------------------------------------------------------------------------------------
def stream(text: str, tool_format: ToolFormat, cuts: list[int], request_id: str = "req-1") -> list:
    feeder = ToolCallStream(request_id, tool_format)
    return [delta for cut in [*cuts, len(text)] if (delta := feeder.feed(text[:cut]))]


def reassemble(deltas) -> tuple[str, list[dict]]:
    content, calls = "", []
    for delta in deltas:
        content += delta.content
        for entry in delta.tool_calls:
            if "id" in entry:
                assert entry["index"] == len(calls) and entry["type"] == "function"
                calls.append(
                    {"id": entry["id"], "name": entry["function"]["name"], "arguments": entry["function"]["arguments"]}
                )
            else:
                assert set(entry) == {"index", "function"} and set(entry["function"]) == {"arguments"}
                calls[entry["index"]]["arguments"] += entry["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize(("tool_format", "text", "expected"), OUTPUTS.values(), ids=OUTPUTS.keys())
def test_streamed_deltas_reassemble_to_the_final_calls(
    tool_format: ToolFormat, text: str, expected: ParsedOutput
) -> None:
    for seed in range(20):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 30))))
        content, calls = reassemble(stream(text, tool_format, cuts))
        assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in expected.tool_calls]
        assert [c["id"] for c in calls] == [tool_call_id("req-1", i) for i in range(len(calls))]
        assert (content.strip() or None) == (expected.content.strip() if expected.content else None)


def test_a_replayed_stream_yields_the_same_deltas() -> None:
    _, text, _ = OUTPUTS["hermes_two_calls"]
    cuts = list(range(1, len(text), 3))
    assert stream(text, ToolFormat.HERMES, cuts) == stream(text, ToolFormat.HERMES, cuts)
    first_call = next(d for d in stream(text, ToolFormat.HERMES, cuts, "req-2") if d.tool_calls).tool_calls[0]
    assert first_call["id"] == tool_call_id("req-2", 0)
    assert tool_call_id("req-1", 0) != tool_call_id("req-1", 1) != tool_call_id("req-2", 1)


def test_a_whole_call_in_one_chunk_is_one_delta() -> None:
    _, text, _ = OUTPUTS["generic_call"]
    (delta,) = stream(text, ToolFormat.GENERIC, [])
    assert delta.tool_calls == [
        {
            "index": 0,
            "id": tool_call_id("req-1", 0),
            "type": "function",
            "function": {"name": "get_weather", "arguments": WEATHER_ARGS},
        }
    ]


def test_the_first_delta_waits_for_the_name_and_tags_are_never_shown() -> None:
    feeder = ToolCallStream("r", ToolFormat.HERMES)
    assert feeder.feed("Hi <tool").content == "Hi "  # may be the start of <tool_call>: held back
    assert not feeder.feed('Hi <tool_call>{"arguments": {"a": 1}, "na')
    delta = feeder.feed('Hi <tool_call>{"arguments": {"a": 1}, "name": "f"')
    assert delta.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


def test_text_that_turns_out_malformed_is_released_as_content() -> None:
    feeder = ToolCallStream("r", ToolFormat.HERMES)
    assert feeder.feed("See <tool").content == "See "
    assert feeder.feed("See <tool_call> not json").content == "<tool_call> not json"
    assert feeder.feed("See <tool_call> not json!").content == "!"


# --- templates ----------------------------------------------------------------------------------------------------
QWEN = (
    '{%- if tools %}{{- "<|im_start|>system\\n# Tools\\n<tools>" }}{%- for tool in tools %}{{- tool | tojson }}'
    '{%- endfor %}{{- "</tools>\\nFor each function call, return a json object within <tool_call></tool_call>" }}'
    "{%- endif %}"
)
LLAMA31 = (
    '{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
    '{{- \'{"name": function name, "parameters": dictionary of argument name and its value}\' }}'
    '{%- if builtin_tools is defined %}{{- "<|python_tag|>" }}{%- endif %}{{- "<|eom_id|>" }}'
)
MISTRAL = "{%- if tools is not none %}[AVAILABLE_TOOLS] {{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]"


def test_template_detection_picks_the_format(smollm2_tokenizer_dir: Path) -> None:
    smollm2 = (smollm2_tokenizer_dir / "chat_template.jinja").read_text()
    assert not template_supports_tools(smollm2) and detect_format(smollm2) is ToolFormat.GENERIC
    assert detect_format(QWEN) is ToolFormat.HERMES
    assert detect_format(LLAMA31) is ToolFormat.LLAMA3_JSON
    assert detect_format(MISTRAL) is ToolFormat.MISTRAL
    assert detect_format(None) is ToolFormat.GENERIC
    # `tools` outside Jinja code, or as part of another name, is not tool support.
    assert not template_supports_tools("You have tools. {{ messages[0].content }}{% if use_tools_x %}{% endif %}")
    assert not template_supports_tools("{{ 'tools' }}{% set x = message.tools %}")
    assert template_supports_tools("{%- if tools -%}<tool_call>{%- endif -%}")
