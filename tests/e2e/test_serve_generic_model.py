"""`inferq serve` on a non-llama model (a tiny random Gemma 3 with sliding-window layers, from a local directory):
the worker takes the generic model path, and the openai SDK streams a chat completion whose tokens equal
transformers `generate()` on the same prompt."""

from __future__ import annotations

import signal
from pathlib import Path

import openai
import pytest
import torch

from tests.e2e.serve import start_serve, wait_healthy
from tests.model_fixtures import build_tiny_model

pytestmark = pytest.mark.slow


def test_streams_a_chat_completion_from_a_generic_path_model(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny_model("gemma3", tmp_path / "tiny-gemma3", smollm2_tokenizer_dir)
    log_path = tmp_path / "serve.log"
    proc, base = start_serve(
        {
            "INFERQ_DATA_DIR": str(tmp_path / "data"),
            "INFERQ_MODEL": str(model_dir),
            "INFERQ_DTYPE": "float32",
            "INFERQ_NUM_SPECULATIVE_TOKENS": "0",
            "INFERQ_DEPLOY_AGENT": "false",
            "INFERQ_LOG_FORMAT": "json",
        },
        log_path,
    )
    try:
        wait_healthy(proc, base, log_path, timeout=180)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
        messages = [{"role": "user", "content": "Tell me about sliding windows."}]
        stream = client.chat.completions.create(
            model="tiny-gemma3",
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert sum(1 for piece in pieces if piece) > 1, "the reply did not stream"

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24)
        assert "".join(pieces) == tokenizer.decode(out[0, len(prompt) :])
        assert '"model_impl": "generic"' in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
