"""A stored Responses API response (`/v1/responses`): the response object as clients see it, the input items
of its request, and the conversation before them (so `previous_response_id` can continue it), with its owner."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from contracts.base import Contract


class StoredResponse(Contract):
    id: str  # resp_<hex>
    owner: str  # caller.owner of whoever created it; nobody else sees it
    response: dict[str, Any]  # the Response object (status, output, usage, ...) as last written
    input_items: list[dict[str, Any]] = Field(default_factory=list)  # this request's input, normalised items
    history: list[dict[str, Any]] = Field(default_factory=list)  # earlier turns (previous responses' in+out)
    request: dict[str, Any] | None = None  # a background response's request, for whoever runs it
    cancel_requested: bool = False  # a background response asked to stop (any replica may hold it)
    # How the answer is read for function calls (a tool format name, api/tools/formats.py); None: plain text. Kept
    # so whichever replica runs a background response reads its answer as the accepting one planned.
    tool_answer_format: str | None = None

    @property
    def status(self) -> str:
        return str(self.response.get("status", ""))

    def conversation(self) -> list[dict[str, Any]]:
        """Everything a follow-up sees: earlier turns, this input, this output."""
        return [*self.history, *self.input_items, *self.response.get("output", [])]
