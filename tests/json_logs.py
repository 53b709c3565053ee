"""Reading the JSON-lines logs our processes write (INFERQ_LOG_FORMAT=json) in tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of `path` that is a JSON object; anything else (a child's plain output) is skipped."""
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines
