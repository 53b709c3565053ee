"""Tools for one request, planned once: what the chat template is given, which constraint goes to the worker, and
how the answer is read back. Every surface with tools calls this module (chat completions; Responses and Messages
convert their own tool shapes to OpenAI function tools and OpenAI-shaped messages first):

    plan = plan_tools(tools, tool_choice, parallel_tool_calls=True, chat_template=tokenizer.chat_template,
                      response_constraint=None, response_param="response_format")   # ApiError 400 on bad input
    await plan.check()                           # compiles the tool schemas off the loop; ApiError 400 naming one
    prompt = render_chat(chat_messages, tokenizer, tools=plan)   # api/serving/chat.py, which calls
             # plan.template_messages(dicts) and apply_chat_template(..., **plan.template_kwargs())
    GenerateRequest(..., constraint=plan.constraint)
    stream = plan.stream(request_id, choice)     # None: plain text; else .feed(text so far) / .finish(text) give
                                                 # StreamDelta(content, tool_calls) in OpenAI's delta shape
    reply = plan.reply(text, request_id, choice, finish_reason)   # AssistantReply(content, tool_calls, finish_reason)

`plan_tools(None, None, chat_template=...)` is the plan of a request without tools; it still renders tool calls and
tool results found in the conversation.

Decisions (docs/api.md, "Tool calling"):
- The format is the chat template's own (api/tools/templates.py): a template that reads `tools` is given them
  (`apply_chat_template(tools=...)`) and history in the Hugging Face message shape; a template without tool support
  gets the generic instructions in its system message, earlier calls as the generic JSON and tool results as user
  messages (`{"tool_response": ...}`), since such templates may refuse a `tool` role.
- `required` and a named function are forced by a grammar in the generic JSON envelope, whatever the template;
  `auto` is forced into the envelope only on a template without tool support (with `{"response": ...}` as the way
  out, as llama.cpp's generic format) and otherwise read from the model's own format; `none` offers no tools and
  reads nothing.
- A client constraint (`response_format` / `structured_outputs`) may only join a plan that adds none of its own
  (`none`, or `auto` in the model's own format, where it shapes the whole answer, which is still read for calls).
- `parallel_tool_calls: false` allows one call: the envelope holds one, and a model's own format is cut after one.
- Call ids are `tool_call_id(f"{request_id}/{choice}", index)`: deterministic, so a resumed stream repeats them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.errors import ApiError
from api.structured import StructuredValidation
from api.tools.definitions import (
    EMPTY_PARAMETERS,
    FunctionTool,
    NamedToolChoice,
    ToolChoice,
    ToolChoiceError,
    call_constraint,
    generic_tools_prompt,
)
from api.tools.formats import ToolFormat
from api.tools.streaming import ToolCallStream
from api.tools.templates import detect_format
from contracts import ErrorCode
from contracts.constraints import Constraint, JsonObjectConstraint, JsonSchemaConstraint


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, message, param=param)


def _is_forced(tool_choice: ToolChoice) -> bool:
    return tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)


@dataclass(frozen=True, slots=True)
class AssistantReply:
    """One choice's answer as OpenAI's `message` has it."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # `message.tool_calls` entries
    finish_reason: str | None = None


def tool_finish_reason(finish_reason: str | None, has_calls: bool) -> str | None:
    """An answer that ended on its own with calls ends `tool_calls`; a cut one stays `length`."""
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


@dataclass(frozen=True, slots=True)
class ToolPlan:
    template_format: ToolFormat  # how the chat template writes calls (GENERIC: it has no tool support)
    answer_format: ToolFormat | None = None  # how the answer is read; None: plain text
    tools: tuple[FunctionTool, ...] = ()  # the tools offered to the model (none for tool_choice none)
    tool_choice: ToolChoice = "none"
    parallel_tool_calls: bool = True
    constraint: Constraint | None = None  # for the worker: the tools' envelope or the client's own
    constraint_param: str = "tools"  # the request field a constraint that does not compile is blamed on
    tool_schemas: tuple[JsonSchemaConstraint, ...] = ()  # each tool's parameters, checked by `check`
    # The client's JSON output format when it shapes the envelope's direct answer (`auto`, generic format), and the
    # field it came from: checked on its own, so a schema that does not compile is blamed on that field.
    answer_constraint: Constraint | None = None
    answer_param: str = "response_format"

    # --- before queueing ----------------------------------------------------------------------------------------
    async def check(self, validation: StructuredValidation | None = None) -> None:
        """Compile every tool's parameter schema and the constraint as a worker will; ApiError 400 naming the
        first that does not (in a thread: llguidance releases the GIL). `validation`: the app's, which skips what
        it validated before (an agent sends the same tools every turn) and times the check, as for
        `check_before_queueing`."""
        checks = [(schema, f"tools[{index}].function.parameters") for index, schema in enumerate(self.tool_schemas)]
        if self.answer_constraint is not None:
            checks.append((self.answer_constraint, self.answer_param))
        if self.constraint is not None:
            checks.append((self.constraint, self.constraint_param))
        await (validation or StructuredValidation()).check(checks)

    # --- the prompt ---------------------------------------------------------------------------------------------
    def template_kwargs(self) -> dict[str, Any]:
        """Extra arguments for `apply_chat_template`: the tools, for a template that renders them."""
        if self.tools and self.template_format is not ToolFormat.GENERIC:
            return {"tools": [tool.model_dump(exclude_none=True) for tool in self.tools]}
        return {}

    def template_messages(self, messages: Sequence[Mapping[str, Any]], param: str = "messages") -> list[dict]:
        """OpenAI-shaped chat messages (`role`, `content` text, assistant `tool_calls` with JSON-text arguments,
        tool `tool_call_id`) as the chat template takes them. A tool message that answers no call is a 400."""
        names = check_tool_messages(messages, param)
        native = self.template_format is not ToolFormat.GENERIC
        rendered: list[dict[str, Any]] = []
        for message in messages:
            if native:
                rendered.append(_native_message(message, names))
            elif message["role"] == "tool":
                line = json.dumps(
                    {"tool_response": {"name": names[message["tool_call_id"]], "content": _text(message)}}
                )
                if rendered and rendered[-1].get("_tool_results"):  # consecutive results share one user turn
                    rendered[-1]["content"] += "\n" + line
                else:
                    rendered.append({"role": "user", "content": line, "_tool_results": True})
            else:
                rendered.append({"role": message["role"], "content": self._generic_content(message)})
        for message in rendered:
            message.pop("_tool_results", None)
        if self.tools and self.answer_format is ToolFormat.GENERIC:
            instructions = generic_tools_prompt(
                list(self.tools),
                self.tool_choice,
                parallel_tool_calls=self.parallel_tool_calls,
                json_answer=self.answer_constraint is not None,
            )
            if rendered and rendered[0]["role"] in ("system", "developer"):
                rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{instructions}".lstrip()}
            else:
                rendered.insert(0, {"role": "system", "content": instructions})
        return rendered

    def _generic_content(self, message: Mapping[str, Any]) -> str:
        calls = message.get("tool_calls") or []
        if not calls:
            return _text(message)
        written = [{"name": call["function"]["name"], "arguments": _arguments(call)} for call in calls]
        envelope = (
            {"tool_call": written[0]} if len(written) == 1 and not self.parallel_tool_calls else {"tool_calls": written}
        )
        return json.dumps(envelope)  # the calls as this plan's grammar has the model write them

    # --- the answer ---------------------------------------------------------------------------------------------
    def stream(self, request_id: str, choice: int = 0) -> ToolCallStream | None:
        """One choice's reader, None when the answer is plain text."""
        if self.answer_format is None:
            return None
        return ToolCallStream(
            f"{request_id}/{choice}", self.answer_format, max_calls=None if self.parallel_tool_calls else 1
        )

    def reply(self, text: str, request_id: str, choice: int = 0, finish_reason: str | None = None) -> AssistantReply:
        """A whole answer read at once: exactly what its stream's deltas add up to."""
        stream = self.stream(request_id, choice)
        if stream is None:
            return AssistantReply(text, finish_reason=finish_reason)
        stream.feed(text)
        stream.finish(text)
        content = stream.content.strip() if stream.calls else stream.content
        return AssistantReply(content or None, stream.calls, tool_finish_reason(finish_reason, bool(stream.calls)))


def plan_tools(
    tools: Sequence[FunctionTool] | None,
    tool_choice: ToolChoice | None,
    *,
    parallel_tool_calls: bool | None = True,
    chat_template: str | Mapping[str, str] | None,
    response_constraint: Constraint | None = None,
    response_param: str = "response_format",
) -> ToolPlan:
    """The plan for a request; ApiError (400) for a tool_choice without tools or naming an unknown function,
    duplicate tool names, a schema over the size limit, or a client constraint that conflicts with the tools'."""
    tools = list(tools or [])
    template_format = detect_format(_template_text(chat_template))
    choice: ToolChoice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    parallel = parallel_tool_calls is not False
    if not tools:
        if choice != "none":
            raise _invalid("tool_choice needs tools: list the functions the model may call", "tool_choice")
        return ToolPlan(template_format, constraint=response_constraint, constraint_param=response_param)
    names = [tool.function.name for tool in tools]
    if duplicate := next((name for name in names if names.count(name) > 1), None):
        raise _invalid(f"tools: the function name {duplicate!r} is used twice", "tools")
    # A direct answer of `auto` in the generic envelope follows the client's JSON output format, as its
    # `response` value (agent SDKs send tools, `auto` and their output schema together).
    response_schema = _response_schema(response_constraint) if not _is_forced(choice) else None
    try:
        envelope = call_constraint(
            tools, choice, parallel_tool_calls=parallel, tool_format=template_format, response_schema=response_schema
        )
    except ToolChoiceError as exc:
        raise _invalid(str(exc), "tool_choice") from exc
    except ValidationError as exc:  # the envelope of all the tools is over the schema size limit
        raise _invalid(f"tools: the tools' schemas together are too large: {_first_error(exc)}", "tools") from exc
    strict = envelope.strict if envelope is not None else None
    schemas = tuple(_tool_schema(tool, index, strict) for index, tool in enumerate(tools))
    if choice == "none":
        return ToolPlan(
            template_format,
            tool_schemas=schemas,
            constraint=response_constraint,
            constraint_param=response_param,
        )
    # A forced call has no text for a client constraint to shape, so the envelope alone constrains the answer (as
    # OpenAI accepts both; agent SDKs send their output schema with every turn, the forced one included).
    if envelope is not None and response_constraint is not None and response_schema is None and not _is_forced(choice):
        raise _invalid(
            f"{response_param} cannot be combined with tool_choice {_choice_name(choice)} here: the tools already "
            "constrain the answer to a JSON document, which can hold a JSON schema or json_object answer but not a "
            "regex, choice or grammar (those join tool_choice none, required or a named function, or auto on a "
            "model whose chat template has its own tool format)",
            response_param,
        )
    return ToolPlan(
        template_format,
        answer_format=ToolFormat.GENERIC if envelope is not None else template_format,
        tools=tuple(tools),
        tool_choice=choice,
        parallel_tool_calls=parallel,
        constraint=envelope if envelope is not None else response_constraint,
        constraint_param="tools" if envelope is not None else response_param,
        tool_schemas=schemas,
        answer_constraint=response_constraint if envelope is not None and response_schema is not None else None,
        answer_param=response_param,
    )


def _response_schema(constraint: Constraint | None) -> dict[str, Any] | None:
    """The JSON schema of a client's JSON output format, for the `response` of the generic envelope; None for no
    format or one that is not JSON (a regex or grammar cannot sit inside a JSON document)."""
    if isinstance(constraint, JsonSchemaConstraint):
        return constraint.json_schema
    if isinstance(constraint, JsonObjectConstraint):
        return {"type": "object"}
    return None


def check_tool_messages(messages: Sequence[Mapping[str, Any]], param: str = "messages") -> dict[str, str]:
    """Each tool message answers a call of the assistant message it follows (only tool messages between them),
    as OpenAI requires; returns call id -> function name. ApiError 400 naming the message otherwise."""
    names: dict[str, str] = {}
    open_calls: set[str] = set()
    for position, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not call_id:
                raise _invalid(f"{param}[{position}]: a tool message needs the tool_call_id it answers", param)
            if call_id not in open_calls:
                raise _invalid(
                    f"{param}[{position}]: tool_call_id {call_id!r} answers no call of the assistant message "
                    "before it (tool messages follow the assistant message whose tool_calls they answer)",
                    param,
                )
            continue
        open_calls = set()
        for call in message.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
            open_calls.add(call["id"])
    return names


def _tool_schema(tool: FunctionTool, index: int, strict: bool | None) -> JsonSchemaConstraint:
    parameters = tool.function.parameters or EMPTY_PARAMETERS
    try:
        return JsonSchemaConstraint(
            json_schema=parameters, strict=strict if strict is not None else bool(tool.function.strict)
        )
    except ValidationError as exc:
        raise _invalid(
            f"tools[{index}].function.parameters: {_first_error(exc)}", f"tools[{index}].function.parameters"
        ) from exc


def _first_error(exc: ValidationError) -> str:
    return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")


def _choice_name(choice: ToolChoice) -> str:
    return f"{{function: {choice.function.name}}}" if isinstance(choice, NamedToolChoice) else choice


def _template_text(chat_template: str | Mapping[str, str] | None) -> str | None:
    """Some tokenizers carry several named templates; transformers uses `tool_use` when tools are given."""
    if isinstance(chat_template, Mapping):
        return chat_template.get("tool_use") or chat_template.get("default")
    return chat_template


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _arguments(call: Mapping[str, Any]) -> Any:
    """Arguments as a JSON value (what Hugging Face templates expect and `tojson` writes); text that is not JSON
    stays text."""
    try:
        return json.loads(call["function"]["arguments"])
    except ValueError:
        return call["function"]["arguments"]


def _native_message(message: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The Hugging Face chat message shape tool-aware templates read."""
    rendered: dict[str, Any] = {"role": message["role"], "content": _text(message)}
    if calls := message.get("tool_calls"):
        rendered["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": _arguments(call)},
            }
            for call in calls
        ]
    if message["role"] == "tool":
        rendered["tool_call_id"] = message["tool_call_id"]
        rendered["name"] = names[message["tool_call_id"]]
    return rendered
