"""Which tool format a model's chat template uses. A template supports tools when its Jinja code reads the `tools`
variable (transformers passes `tools=` to it); the format follows from the markers the template writes."""

from __future__ import annotations

import re

from api.tools.formats import HERMES_OPEN, MISTRAL_TAG, PYTHON_TAG, ToolFormat

# `tools` as a variable inside a Jinja statement or expression ({% if tools %}, {{ tools | tojson }}, ...).
_JINJA_BLOCK = re.compile(r"\{%-?(.*?)-?%\}|\{\{-?(.*?)-?\}\}", re.DOTALL)
_TOOLS_VARIABLE = re.compile(r"(?<![\w.'\"])tools(?![\w'\"])")


def template_supports_tools(chat_template: str | None) -> bool:
    if not chat_template:
        return False
    return any(
        _TOOLS_VARIABLE.search(match.group(1) or match.group(2) or "") for match in _JINJA_BLOCK.finditer(chat_template)
    )


def detect_format(chat_template: str | None) -> ToolFormat:
    """The template's own format; `generic` (grammar-forced JSON) for a template without tools or with a format
    no parser here knows."""
    if not template_supports_tools(chat_template):
        return ToolFormat.GENERIC
    assert chat_template is not None
    if HERMES_OPEN in chat_template:
        return ToolFormat.HERMES
    if MISTRAL_TAG in chat_template:
        return ToolFormat.MISTRAL
    if PYTHON_TAG in chat_template or ("<|eom_id|>" in chat_template and '"parameters"' in chat_template):
        return ToolFormat.LLAMA3_JSON
    return ToolFormat.GENERIC
