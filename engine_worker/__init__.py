"""The engine worker: a synchronous, I/O-free, torch-free engine core, the model runner behind it, the engine
thread, and the NATS bridge that feeds it (docs/architecture.md).

Core (no NATS, no asyncio, no torch): `sequence` (per-choice state) → `scheduler` (continuous batching, chunked
prefill, preemption) + `kv_cache` (slot and token accounting, sized by `kv_budget`) → `validation` (frozen
limits, typed errors), `sampling_rows` (what to sample per row), `speculative` (drafts and their acceptance),
`stopping` + `detokenizer` (appending tokens, stop checks, incremental text), `output_builder` (deltas,
logprobs, best_of).
`engine.Engine.step()` ties them together: schedule → run → postprocess.

Device side (torch), behind `executor.ModelExecutor`: `model_runner` (lean batched llama forward over the HF
weights; its KV buffers from `kv_memory`), `generic_runner` (any transformers decoder through its own layers),
`sampler` (vLLM sampling semantics, batch-independent randomness), `pooling`; `encoder` serves embedding-only
models. `engine_loop` runs an engine on its own thread; `bridge` connects it to NATS.

Nothing heavy is imported here, so `import engine_worker` stays cheap.
"""
