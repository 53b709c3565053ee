"""The engine worker: a synchronous, I/O-free engine core plus the NATS bridge that feeds it.

Core modules (no NATS, no asyncio; only `model_runner`, `kv_memory` and `sampler` import torch):
`sequence` (per-choice state) → `scheduler` (continuous batching, chunked prefill, preemption) + `kv_cache`
(slot and token accounting, sized by `kv_budget`) → `model_runner` (lean batched llama forward over the HF
weights; its KV buffers from `kv_memory`) + `sampler` (vLLM sampling semantics, batch-independent randomness) →
`detokenizer` (incremental, UTF-8 safe, stop strings) → `outputs` (`RequestOutput`). `engine.Engine.step()` ties
them together: schedule → run → postprocess.

Nothing heavy is imported here, so `import engine_worker` stays cheap.
"""
