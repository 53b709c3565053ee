"""The base every wire message derives from."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict

# Bumped on any change a reader of an older version could misinterpret.
SCHEMA_VERSION = 1


class Contract(BaseModel):
    """Immutable, strict (unknown fields are an error, not silently dropped), JSON on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes | str) -> Self:
        return cls.model_validate_json(data)
