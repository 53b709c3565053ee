"""What the engine core needs from the device side, as a protocol: the core (engine, scheduler, KV accounting,
output building) stays torch-free and `model_runner.ModelRunner` is the one implementation. A runner for another
model family (or a fake in a test) implements these and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from contracts import EmbeddingVector, EmbedRequest
    from engine_worker.kv_cache import Relayout
    from engine_worker.model_runner import RunOutput
    from engine_worker.sampling_rows import SamplingRow
    from engine_worker.sequence import Sequence


class ModelExecutor(Protocol):
    max_model_len: int
    vocab_size: int
    num_layers: int

    @property
    def kv_bytes_per_token(self) -> int: ...

    @property
    def device_name(self) -> str:
        """The torch device, e.g. "cpu" or "cuda:0"."""
        ...

    @property
    def dtype_name(self) -> str: ...

    def allocate_kv_cache(self, capacity: int, slot_len: int) -> None: ...

    def compiled_decode_state(self) -> str | None:
        """The compiled small step's state ("compiling", "ready", "failed"), or None for a runner without one;
        safe from any thread."""
        ...

    def relayout(self, plan: Relayout) -> None: ...

    def copy_prefixes(self, copies: list[tuple[int, int, int]]) -> None: ...

    def allocate_prefix_store(self, num_blocks: int, block_size: int) -> None: ...

    def release_prefix_blocks(self, block_ids: list[int]) -> None:
        """Hand the memory of evicted store blocks back (CPU); they read as zeros until saved into again."""
        ...

    def save_prefix(self, slot: int, copies: list[tuple[int, int]]) -> None:
        """Copy (block index in the slot, store block id) blocks of KV from a slot into the prefix store."""
        ...

    def load_prefixes(self, loads: list[tuple[int, list[int]]]) -> None:
        """Copy (slot, store block ids) cached prefixes into the start of their slots."""
        ...

    def run(
        self,
        scheduled: list[tuple[Sequence, int]],
        sample_seqs: list[Sequence],
        sample_rows: list[SamplingRow],
        prompt_logprob_seqs: dict[Sequence, tuple[int, int]],
    ) -> RunOutput: ...

    def pooled_vectors(self, request: EmbedRequest) -> list[EmbeddingVector]:
        """Pooled hidden states of each input of `request`, outside the KV cache."""
        ...
