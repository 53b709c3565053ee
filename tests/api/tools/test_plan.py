"""The tool plan (api/tools/plan.py): per template and tool_choice, what the template is given, which constraint
goes to the worker and how answers are read; bad input is a 400 naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.errors import ApiError
from api.tools.definitions import FunctionTool, NamedToolChoice
from api.tools.formats import ToolFormat
from api.tools.plan import check_tool_messages, plan_tools
from api.tools.streaming import tool_call_id
from contracts.constraints import MAX_SCHEMA_BYTES, JsonSchemaConstraint, RegexConstraint
from contracts.grammar import grammar_for
from tests.api.tools.test_tools import TIME, WEATHER
from tests.tool_templates import HERMES_TEMPLATE

TOOLS = [WEATHER, TIME]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees, rain"},
]


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def named(name: str) -> NamedToolChoice:
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})


def render(tokenizer, plan, messages, template=None) -> str:
    return tokenizer.apply_chat_template(
        plan.template_messages(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
        **plan.template_kwargs(),
    )


# --- choosing -----------------------------------------------------------------------------------------------------
def test_a_template_without_tools_gets_the_generic_format_forced_by_grammar(smollm2) -> None:
    plan = plan_tools(TOOLS, None, chat_template=smollm2.chat_template)  # tools without tool_choice: auto
    assert plan.tool_choice == "auto" and plan.answer_format is ToolFormat.GENERIC
    assert isinstance(plan.constraint, JsonSchemaConstraint)
    assert {"response"} in [set(option["properties"]) for option in plan.constraint.json_schema["anyOf"]]
    assert plan.template_kwargs() == {}
    prompt = render(smollm2, plan, [{"role": "user", "content": "Weather in Oslo?"}])
    assert '"name": "get_weather"' in prompt and '{"response": ' in prompt  # the instructions, as a system turn
    assert prompt.index("get_weather") < prompt.index("Weather in Oslo?")


def test_a_template_with_its_own_format_is_given_the_tools_and_read_in_that_format(smollm2) -> None:
    plan = plan_tools(TOOLS, "auto", chat_template=HERMES_TEMPLATE)
    assert plan.answer_format is ToolFormat.HERMES and plan.constraint is None  # the model's own format, unforced
    prompt = render(smollm2, plan, [{"role": "user", "content": "hi"}], HERMES_TEMPLATE)
    assert "<tools>" in prompt and '"name": "get_time"' in prompt
    forced = plan_tools(TOOLS, "required", chat_template=HERMES_TEMPLATE)
    assert forced.answer_format is ToolFormat.GENERIC and forced.constraint is not None  # forced: the envelope


def test_required_and_named_choices_are_forced_and_none_offers_nothing(smollm2) -> None:
    required = plan_tools(TOOLS, "required", parallel_tool_calls=False, chat_template=smollm2.chat_template)
    assert "anyOf" not in required.constraint.json_schema  # no {"response"} way out
    assert required.constraint.json_schema["required"] == ["tool_call"]
    only_time = plan_tools(TOOLS, named("get_time"), chat_template=smollm2.chat_template)
    assert "get_weather" not in json.dumps(only_time.constraint.json_schema)
    none = plan_tools(TOOLS, "none", chat_template=HERMES_TEMPLATE)
    assert none.constraint is None and none.answer_format is None and none.template_kwargs() == {}
    assert none.stream("r") is None and none.reply("<tool_call>", "r").content == "<tool_call>"


def test_a_client_constraint_joins_only_plans_without_their_own(smollm2) -> None:
    regex = RegexConstraint(pattern="<tool_call>.*")
    native = plan_tools(TOOLS, "auto", chat_template=HERMES_TEMPLATE, response_constraint=regex)
    assert native.constraint == regex and native.answer_format is ToolFormat.HERMES
    assert plan_tools(TOOLS, "none", chat_template=smollm2.chat_template, response_constraint=regex).constraint == regex
    # A forced call has no text to shape: the call's envelope is the constraint (agent SDKs send their output schema
    # with every turn).
    for forced in ("required", named("get_time")):
        plan = plan_tools(TOOLS, forced, chat_template=HERMES_TEMPLATE, response_constraint=regex)
        assert plan.constraint == plan_tools(TOOLS, forced, chat_template=HERMES_TEMPLATE).constraint != regex
        assert plan.answer_format is ToolFormat.GENERIC
    with pytest.raises(ApiError, match="structured_outputs cannot be combined with tool_choice auto") as caught:
        plan_tools(
            TOOLS,
            "auto",
            chat_template=smollm2.chat_template,
            response_constraint=regex,
            response_param="structured_outputs",
        )
    assert caught.value.info.param == "structured_outputs"


def test_auto_in_the_generic_envelope_answers_directly_in_the_clients_json_format(smollm2) -> None:
    """Agent SDKs send tools, `auto` and their output schema together: the envelope's direct answer is that
    schema (its `$defs` moved to the root, where its references point), checked under the client's field."""
    output = {
        "type": "object",
        "properties": {"answer": {"$ref": "#/$defs/Answer"}},
        "required": ["answer"],
        "$defs": {"Answer": {"type": "string", "maxLength": 20}},
    }
    client = JsonSchemaConstraint(json_schema=output)
    plan = plan_tools(TOOLS, "auto", chat_template=smollm2.chat_template, response_constraint=client)
    schema = plan.constraint.json_schema
    [direct] = [option for option in schema["anyOf"] if "response" in option["properties"]]
    assert direct["properties"]["response"] == {key: output[key] for key in ("type", "properties", "required")}
    assert schema["$defs"] == output["$defs"]
    assert (plan.answer_constraint, plan.answer_param) == (client, "response_format")
    assert (
        "as JSON in the requested format" in plan.template_messages([{"role": "user", "content": "hi"}])[0]["content"]
    )
    # The envelope is one grammar: a direct answer that breaks the client's schema cannot be generated.
    assert _generates(plan.constraint, '{"response": {"answer": "Oslo"}}', smollm2)
    assert not _generates(plan.constraint, '{"response": {"answer": 3}}', smollm2)
    assert not _generates(plan.constraint, '{"response": "Oslo"}', smollm2)


def _generates(constraint, text: str, tokenizer) -> bool:
    """Whether a worker's matcher for `constraint` lets the model write exactly `text`."""
    import llguidance.hf

    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar_for(constraint), log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


async def test_a_client_schema_that_does_not_compile_is_blamed_on_its_field(smollm2) -> None:
    broken = JsonSchemaConstraint(json_schema={"type": "object", "properties": {"a": {"type": "strin"}}})
    plan = plan_tools(TOOLS, "auto", chat_template=smollm2.chat_template, response_constraint=broken)
    with pytest.raises(ApiError) as caught:
        await plan.check()
    assert caught.value.info.param == "response_format"


# --- conversation history -----------------------------------------------------------------------------------------
def test_calls_and_results_render_as_generic_json_for_a_template_without_tools(smollm2) -> None:
    second = {**CALL, "id": "call_2", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    ]
    rendered = plan_tools(TOOLS, "auto", chat_template=smollm2.chat_template).template_messages(messages)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert json.loads(rendered[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]
    }
    assert [json.loads(line) for line in rendered[3]["content"].splitlines()] == [
        {"tool_response": {"name": "get_weather", "content": "rain"}},
        {"tool_response": {"name": "get_time", "content": "noon"}},
    ]
    # Without tools in the request the history still renders (no instructions then).
    plain = plan_tools(None, None, chat_template=smollm2.chat_template).template_messages(messages)
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]


def test_calls_and_results_render_natively_for_a_template_with_tools(smollm2) -> None:
    plan = plan_tools(TOOLS, "auto", chat_template=HERMES_TEMPLATE)
    prompt = render(smollm2, plan, ROUND_TRIP, HERMES_TEMPLATE)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<tool_response>\n4 degrees, rain\n</tool_response>" in prompt


# --- answers ------------------------------------------------------------------------------------------------------
HERMES_TWO = (
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


def test_a_reply_carries_the_calls_with_deterministic_ids_and_finishes_tool_calls() -> None:
    plan = plan_tools(TOOLS, "auto", chat_template=HERMES_TEMPLATE)
    reply = plan.reply(HERMES_TWO, "chatcmpl-1", 0, "stop")
    assert reply.content == "Checking." and reply.finish_reason == "tool_calls"
    assert [call["function"] for call in reply.tool_calls] == [
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    assert [call["id"] for call in reply.tool_calls] == [tool_call_id("chatcmpl-1/0", i) for i in range(2)]
    assert plan.reply(HERMES_TWO, "chatcmpl-1", 1, "stop").tool_calls[0]["id"] != reply.tool_calls[0]["id"]
    single = plan_tools(TOOLS, "auto", parallel_tool_calls=False, chat_template=HERMES_TEMPLATE)
    assert [call["function"]["name"] for call in single.reply(HERMES_TWO, "r", 0, "stop").tool_calls] == ["get_weather"]


def test_a_reply_is_its_stream_reassembled_and_plain_text_stays_whole() -> None:
    plan = plan_tools(TOOLS, "auto", chat_template=HERMES_TEMPLATE)
    stream = plan.stream("r", 0)
    for end in range(1, len(HERMES_TWO), 7):
        stream.feed(HERMES_TWO[:end])
    stream.finish(HERMES_TWO)
    reply = plan.reply(HERMES_TWO, "r", 0, "stop")
    assert stream.calls == reply.tool_calls and stream.content.strip() == reply.content
    # A text that ends on what looked like the start of a tag was plain text after all.
    plain = plan.stream("r", 0)
    assert plain.feed("a < b and <tool").content == "a < b and "
    assert plain.finish("a < b and <tool").content == "<tool"
    assert plan.reply("a < b and <tool", "r", 0, "stop").content == "a < b and <tool"
    cut = plan.reply('<tool_call>\n{"name": "get_weather", "arguments": {"ci', "r", 0, "length")
    assert cut.finish_reason == "length" and cut.tool_calls[0]["function"]["arguments"] == '{"ci'


def test_a_generic_answer_reads_the_response_or_the_calls(smollm2) -> None:
    plan = plan_tools(TOOLS, "auto", chat_template=smollm2.chat_template)
    assert plan.reply('{"response": "Hello \\"you\\""}', "r", 0, "stop").content == 'Hello "you"'
    called = plan.reply('{"tool_calls": [{"name": "get_time", "arguments": {}}]}', "r", 0, "stop")
    assert called.content is None and called.finish_reason == "tool_calls"
    assert called.tool_calls == [
        {"id": tool_call_id("r/0", 0), "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    ]


# --- bad input ----------------------------------------------------------------------------------------------------
def _refused(call, param: str, match: str) -> None:
    with pytest.raises(ApiError, match=match) as caught:
        call()
    assert caught.value.status == 400 and caught.value.info.param == param


def test_bad_tool_requests_are_400s_naming_the_field() -> None:
    _refused(lambda: plan_tools(TOOLS, named("launch"), chat_template=None), "tool_choice", "'launch', which is not")
    _refused(lambda: plan_tools(None, "required", chat_template=None), "tool_choice", "tool_choice needs tools")
    _refused(lambda: plan_tools([TIME, TIME], "auto", chat_template=None), "tools", "'get_time' is used twice")
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200} for i in range(400)}}
    big = FunctionTool.model_validate({"type": "function", "function": {"name": "big", "parameters": huge}})
    _refused(lambda: plan_tools([big], "none", chat_template=None), "tools[0].function.parameters", "over the limit")
    assert len(json.dumps(huge)) > MAX_SCHEMA_BYTES


async def test_a_tool_schema_that_does_not_compile_is_named() -> None:
    broken = FunctionTool.model_validate(
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": 3}}}}
    )
    plan = plan_tools([TIME, broken], "auto", chat_template=HERMES_TEMPLATE)  # not forced: still checked
    with pytest.raises(ApiError, match=r"tools\[1\].function.parameters: the JSON schema is invalid") as caught:
        await plan.check()
    assert caught.value.info.param == "tools[1].function.parameters"
    await plan_tools(TOOLS, "required", chat_template=None).check()  # good schemas pass


def test_a_tool_message_must_answer_a_call_of_the_assistant_message_before_it() -> None:
    assert check_tool_messages(ROUND_TRIP) == {"call_1": "get_weather"}
    stray = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    _refused(lambda: check_tool_messages(stray), "messages", r"messages\[1\]: tool_call_id 'call_9' answers no call")
    late = [*ROUND_TRIP, {"role": "user", "content": "and?"}, {"role": "tool", "tool_call_id": "call_1", "content": ""}]
    _refused(lambda: check_tool_messages(late), "messages", r"messages\[4\]")
    _refused(lambda: check_tool_messages([{"role": "tool", "content": "x"}]), "messages", "needs the tool_call_id")
