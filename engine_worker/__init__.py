"""The engine worker: a synchronous, I/O-free engine core plus the NATS bridge that feeds it.

Core modules (no NATS, no asyncio; only `model_runner` and `sampler` import torch):
`sequence` (per-choice state) → `scheduler` (continuous batching, chunked prefill, preemption) + `kv_cache`
(slot and token accounting) → `model_runner` (lean batched llama forward over the HF weights) + `sampler`
(vLLM sampling semantics, batch-independent randomness) → `detokenizer` (incremental, UTF-8 safe, stop strings)
→ `outputs` (`RequestOutput`). `engine.Engine.step()` ties them together: schedule → run → postprocess.

Nothing heavy is imported here, so `import engine_worker` stays cheap.
"""
