"""All of a batch's stored results, read in one pass (broker/batch_store.py's `ResultStore.stored`) so that
assembling its files or resuming it costs a few NATS requests per thousand lines, not one per line.

The results go to a spill file as they arrive, with only an index (digest -> where in the file) kept in memory:
a batch may have 100k lines whose results are whole completions, which need not fit in the api's memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from broker import subjects
from broker.batch_store import ResultStore
from contracts import LineResult


class StoredResults:
    """The results one pass found, looked up by custom_id."""

    def __init__(self, spill: BinaryIO):
        self._spill = spill
        self._index: dict[str, tuple[int, int]] = {}  # result digest -> offset, length in the spill file

    @classmethod
    async def read(
        cls, results: ResultStore, batch_id: str, spill: BinaryIO, on_chunk: Callable[[], None] = lambda: None
    ) -> StoredResults:
        """Every result of the batch stored now, kept in `spill` (an empty temporary file the caller owns and
        closes); `on_chunk` is called as each chunk arrives (the run shows it is moving)."""
        stored = cls(spill)
        async for chunk in results.stored(batch_id):
            on_chunk()
            for key, value in chunk:
                stored._keep(key, value)
        return stored

    def _keep(self, key: str, value: bytes) -> None:
        offset = self._spill.seek(0, os.SEEK_END)
        self._spill.write(value)
        digest = key.rpartition(".")[2]  # the result key's last token (subjects.batch_result_digest)
        self._index[digest] = (offset, len(value))  # a key read twice: the later value is newer

    def __len__(self) -> int:
        return len(self._index)

    def get(self, custom_id: str) -> LineResult | None:
        where = self._index.get(subjects.batch_result_digest(custom_id))
        if where is None:
            return None
        self._spill.seek(where[0])
        return LineResult.from_bytes(self._spill.read(where[1]))
