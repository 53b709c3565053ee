"""`inferq bench`: drive a running server's OpenAI streaming API with concurrent streams (like `vllm bench
serve`), optionally next to a naive transformers `generate()` baseline measured in the same run.

Modules: `config` (flags), `prompts` (deterministic token-id prompts), `workloads` (natural-language chat and
multi-turn conversations from `data/`), `client` (a server target, SSE via `sse`), `baseline` (generate() one
request at a time; the only torch user, imported lazily), `levels` (one concurrency level), `chat_run` (the chat
workloads against our server or started variants and a peer), `servers` (the `inferq serve` variants and
llama-server the bench starts), `metrics` (per-request results, percentiles), `report` (table, comparisons,
JSON), `runner` (`main`, the token workload's levels).
"""

from ops.bench.runner import main

__all__ = ["main"]
