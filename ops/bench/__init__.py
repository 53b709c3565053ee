"""`inferq bench`: drive a running server's OpenAI streaming API with concurrent streams (like `vllm bench
serve`), optionally next to a naive transformers `generate()` baseline measured in the same run.

Modules: `config` (flags), `prompts` (deterministic token-id prompts), `client` (the server target, SSE via
`sse`), `baseline` (generate() one request at a time; the only torch user, imported lazily), `metrics`
(per-request results, percentiles), `report` (table, comparison, JSON), `runner` (levels and `main`).
"""

from ops.bench.runner import main

__all__ = ["main"]
