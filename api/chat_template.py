"""Chat templates rendered with jinja2 as transformers' `apply_chat_template(..., tokenize=False)` renders them,
without importing transformers (its tokenizer stack costs the api process ~40-46 MiB it never needs).

A chat template is Jinja written against the environment transformers sets up
(transformers/utils/chat_template_utils.py, `_cached_compile_jinja_template` and `render_jinja_template`), so the
same template only renders the same text in the same environment. Everything a template can see is reproduced
here and pinned against transformers by tests/api/test_chat_template_equivalence.py:

- a sandbox (`ImmutableSandboxedEnvironment`: templates come from model repositories, i.e. untrusted code) with
  `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension (`{% break %}`, `{% continue %}`) and the
  `{% generation %}` block (it marks assistant text for training masks; when rendering it is transparent);
- `tojson` without Jinja's HTML escaping and with `indent`, `separators`, `sort_keys`, `ensure_ascii`;
- the globals `raise_exception(message)`, `strftime_now(format)`, a `dict` and a `namespace` that refuse
  underscore names;
- the variables `messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's named special tokens
  (`bos_token`, `eos_token`, ...);
- the message clean-up: keys whose value is None are dropped (templates test for presence), reasoning under an
  older name is also given as `reasoning_content` and `thinking`;
- `continue_final_message`: the rendering ends inside the final message, without the turn's closing tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning arrives under; templates read the first (gpt-oss templates read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message to find where it ends in the rendered text (transformers uses the same tag).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """The template or its inputs cannot give a prompt (the caller turns it into a 400)."""


def select_template(templates: str | Mapping[str, str] | None, *, tools: Sequence | None) -> str:
    """The template text to render: a tokenizer may carry several named ones, and the `tool_use` one is for
    requests with tools (as transformers' `get_chat_template`)."""
    if isinstance(templates, Mapping):
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ChatTemplateError(f"the model has several chat templates and no default: {sorted(templates)}")
    if not templates:
        raise ChatTemplateError("the model has no chat template")
    return templates


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The rendered prompt text. `variables`: further template variables (the special tokens, template kwargs)."""
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt exclude each other")
    if any(not isinstance(document, Mapping) for document in documents or ()):
        raise ChatTemplateError("documents must be objects with 'title' and 'text'")
    chat = _with_reasoning_aliases([_message(message) for message in messages])
    final_text = _tag_final_message(chat, template) if continue_final_message else None
    context = {
        **_plain(dict(variables or {})),
        "messages": chat,
        "tools": _plain(list(tools)) if tools is not None else None,
        "documents": _plain(list(documents)) if documents is not None else None,
        "add_generation_prompt": add_generation_prompt,
    }
    rendered = _compile(template).render(context)
    return rendered if final_text is None else _cut_after_final_message(rendered, final_text)


def _message(message: Any) -> dict[str, Any]:
    if callable(getattr(message, "model_dump", None)):  # a pydantic message, as transformers accepts
        message = message.model_dump()
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"chat messages must be objects, got {type(message).__name__}")
    return {key: _plain(value) for key, value in message.items() if value is not None}


def _with_reasoning_aliases(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    aliased = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _tag_final_message(chat: list[dict[str, Any]], template: str) -> str:
    """Mark the end of the final message's text; returns that text."""
    final = chat[-1]
    content = final.get("content")
    if content is None:
        raise ChatTemplateError('continue_final_message: the final message has no "content" to continue')
    if "content" not in template:
        raise ChatTemplateError('continue_final_message: the chat template does not render "content"')
    if isinstance(content, list):  # content parts: continue the last text part
        for part in reversed(content):
            if isinstance(part, dict) and "text" in part:
                text, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
                return text
        raise ChatTemplateError("continue_final_message: the final message has no text to continue")
    final["content"] = content + _CONTINUE_TAG
    return content


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ChatTemplateError("continue_final_message: the chat template does not render the final message as given")
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing space: so do we


def _plain(value: Any) -> Any:
    """Plain JSON-like data: the sandbox cannot vet the methods of arbitrary objects (pydantic models, enums)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


# --- the Jinja environment --------------------------------------------------------------------------------------
class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    # Jinja's own `tojson` escapes <, >, & and ' for HTML; prompts need the JSON as written.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type's other attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore names (they would reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


@lru_cache(maxsize=32)  # a process serves a few templates; compiling one takes milliseconds
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc
