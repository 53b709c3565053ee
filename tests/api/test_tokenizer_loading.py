"""The edge loads a model's tokenizer without transformers (api/tokenizer_loading.py): a directory with
tokenizer.json loads on `tokenizers` and the process never imports transformers (let alone torch); only a
directory without one falls back to transformers, logged. That the tokenizer behaves as transformers' does is
tests/api/test_fast_tokenizer.py and test_chat_template_equivalence.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from api.fast_tokenizer import FastTokenizer
from api.tokenizer_loading import load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, wie geht's? 👋"}]
TEXT = "Hello world, 1234 tokens\nand émojis 🎉"


def test_the_api_process_never_imports_transformers(smollm2_tokenizer_dir: Path) -> None:
    """A fresh interpreter builds the app, loads the tokenizer, renders a chat and decodes, as an api process does."""
    script = textwrap.dedent(f"""
        import json, sys, psutil
        from api.app import create_app
        from api.schemas.openai import ChatMessage
        from api.serving.chat import render_chat
        from api.tokenizer_loading import load_tokenizer
        from common.settings import Settings
        from pathlib import Path

        create_app(Settings(nats_url="nats://127.0.0.1:1"))
        tokenizer = load_tokenizer(Path({str(smollm2_tokenizer_dir)!r}))
        ids = render_chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="hi")],
                          tokenizer)
        text = tokenizer.decode(ids)
        heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("transformers", "torch"))
        print(json.dumps({{"heavy": heavy, "text": text, "rss": psutil.Process().memory_info().rss}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["text"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert result["rss"] < 140 * 2**20  # 110 MiB here (2026-12-07); transformers' tokenizer made it 156


def _vocab_and_merges_dir(smollm2: Path, target: Path, tokenizer_class: str) -> Path:
    """SmolLM2's BPE as vocab.json + merges.txt, without tokenizer.json: only transformers can build it."""
    target.mkdir()
    model = json.loads((smollm2 / "tokenizer.json").read_text())["model"]
    (target / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": tokenizer_class}))
    return target


def test_a_directory_with_tokenizer_json_loads_without_transformers(smollm2_tokenizer_dir: Path, tmp_path) -> None:
    """Whatever class the config names (here not even a tokenizer): tokenizer.json is the whole pipeline."""
    shutil.copytree(smollm2_tokenizer_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    (tmp_path / "model" / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "LlamaForCausalLM"})
    )
    with capture_logs() as logs:
        tokenizer = load_tokenizer(tmp_path / "model")
    assert isinstance(tokenizer, FastTokenizer) and logs == []
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_a_directory_without_tokenizer_json_falls_back_to_transformers(smollm2_tokenizer_dir: Path, tmp_path) -> None:
    reference = load_tokenizer(smollm2_tokenizer_dir)
    directory = _vocab_and_merges_dir(smollm2_tokenizer_dir, tmp_path / "named", "GPT2Tokenizer")
    with capture_logs() as logs:
        tokenizer = load_tokenizer(directory)
    assert [entry["event"] for entry in logs] == ["tokenizer.transformers_fallback"]
    assert tokenizer.encode(TEXT, add_special_tokens=False) == reference.encode(TEXT, add_special_tokens=False)
    # A class name that is not a tokenizer is never looked up on `transformers`: AutoTokenizer, logged.
    directory = _vocab_and_merges_dir(smollm2_tokenizer_dir, tmp_path / "not-a-tokenizer", "LlamaForCausalLM")
    with capture_logs() as logs:
        with pytest.raises((OSError, ValueError)):  # AutoTokenizer fails on it too, after the logged fallback
            load_tokenizer(directory)
    assert [entry.get("tokenizer_class") for entry in logs if entry["event"] == "tokenizer.auto_fallback"] == [
        "LlamaForCausalLM"
    ]
