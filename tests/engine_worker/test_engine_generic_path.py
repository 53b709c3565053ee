"""The engine's behaviour suite (test_engine.py) and its transformers oracle (test_engine_oracle.py), run again on
the generic model path with a non-llama model: a tiny Gemma 3 with sliding-window layers. Same tests, same
assertions; only the model and the path differ (the fixtures below override the session's tiny llama).
Covers abort, resume, seeds, n/best_of, stops, priority, embeddings, chunked prefill, preemption, drafts and
logprobs on the generic path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine_worker.engine import Engine, EngineConfig
from tests.engine_worker.conftest import greedy_reference
from tests.engine_worker.test_engine import *  # noqa: F403 (the tests, collected again here)
from tests.engine_worker.test_engine_oracle import *  # noqa: F403
from tests.model_fixtures import build_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    return build_tiny_model("gemma3", tmp_path_factory.mktemp("tiny-gemma3"), smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model: Any) -> Callable[..., list[int]]:
    return greedy_reference(hf_model)


@pytest.fixture(scope="module")
def engine_factory(tiny_model_dir: Path) -> Callable[..., Engine]:
    def make(**overrides: Any) -> Engine:
        config = {"dtype": "float32", "device": "cpu", "max_num_seqs": 8, "torch_threads": 1, **overrides}
        engine = Engine.from_pretrained(tiny_model_dir, EngineConfig(**config))
        assert type(engine.runner).__name__ == "GenericRunner"
        return engine

    return make


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
