"""The `POST /v1/batches` body. Fields the SDK may add that do not change what runs (e.g. output_expires_after)
are accepted and ignored."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator

_WINDOW = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
# OpenAI and vLLM accept only "24h"; shorter windows are ours (tests, quick jobs). A week caps how long a batch may
# hold its owner's share of the batch lane and its stored state: longer is a typo, or a job to split up.
MAX_WINDOW_S = 7 * 86_400
MAX_METADATA_PAIRS = 16


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None

    @field_validator("completion_window")
    @classmethod
    def _window_is_a_duration(cls, value: str) -> str:
        if not (match := _WINDOW.match(value)):
            raise ValueError("completion_window must be a duration such as 24h (also accepted: 90s, 30m, 2d)")
        if _seconds(match) > MAX_WINDOW_S:
            raise ValueError(f"completion_window is at most {MAX_WINDOW_S // 86_400}d")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_within_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
        if any(len(key) > 64 or len(item) > 512 for key, item in value.items()):
            raise ValueError("metadata keys are limited to 64 characters and values to 512")
        return value

    @property
    def window_s(self) -> int:
        match = _WINDOW.match(self.completion_window)
        assert match is not None  # validated
        return _seconds(match)


def _seconds(window: re.Match[str]) -> int:
    return int(window.group(1)) * _UNIT_S[window.group(2)]
