"""Reading the JSON-lines logs our processes write (INFERQ_LOG_FORMAT=json) in tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of `path` that is a JSON object; anything else (a child's plain output) is skipped."""
    return [line for text in _lines(path) if (line := _json_object(text)) is not None]


def non_json_lines(path: Path) -> list[str]:
    """The lines of `path` that are not JSON objects (what `json_log_lines` skips)."""
    return [text for text in _lines(path) if _json_object(text) is None]


def _lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        line = json.loads(text)
    except json.JSONDecodeError:
        return None
    return line if isinstance(line, dict) else None
