"""The edge loads a model's tokenizer without torch or transformers' model code, and gets the tokenizer
AutoTokenizer would have given it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from api.tokenizer_loading import load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, wie geht's? 👋"}]
TEXT = "Hello world, 1234 tokens\nand émojis 🎉"


def test_the_api_process_stays_free_of_torch_and_model_code(smollm2_tokenizer_dir: Path) -> None:
    """A fresh interpreter builds the app, loads the tokenizer and renders a chat, as an api process does."""
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
        ids = render_chat([ChatMessage(role="user", content="hi")], tokenizer)
        heavy = [name for name in ("torch", "transformers.models.llama.modeling_llama",
                                   "transformers.modeling_utils", "transformers.configuration_utils")
                 if name in sys.modules]
        print(json.dumps({{"heavy": heavy, "ids": len(ids), "rss": psutil.Process().memory_info().rss}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["ids"] > 5
    assert result["rss"] < 250 * 2**20  # with torch imported it is ~330 MB


def _auto(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _sim_tokenizer(tmp_path: Path) -> Path:
    from engine_worker.sim import write_sim_tokenizer

    return write_sim_tokenizer(tmp_path / "sim", 300)


@pytest.mark.parametrize("which", ["smollm2", "sim"])
def test_same_tokenizer_as_auto_tokenizer(which: str, smollm2_tokenizer_dir: Path, tmp_path: Path) -> None:
    directory = smollm2_tokenizer_dir if which == "smollm2" else _sim_tokenizer(tmp_path)
    ours, auto = load_tokenizer(directory), _auto(directory)
    assert type(ours) is type(auto)
    text = TEXT if which == "smollm2" else "w10 w11 w250"
    ids = auto.encode(text)
    assert ours.encode(text) == ids and ours.decode(ids) == auto.decode(ids)
    assert ours.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
    assert (len(ours), ours.eos_token_id, ours.bos_token_id) == (len(auto), auto.eos_token_id, auto.bos_token_id)
    messages = MESSAGES if which == "smollm2" else [{"role": "user", "content": "w12 w13"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_a_directory_naming_no_tokenizer_class_falls_back_to_auto_tokenizer(
    smollm2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    for name in ("tokenizer.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((smollm2_tokenizer_dir / name).read_bytes())
    config = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaForCausalLM"  # not a tokenizer: must not be resolved on `transformers`
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with capture_logs() as logs:
        with pytest.raises((OSError, ValueError)):  # AutoTokenizer fails on it too, after the logged fallback
            load_tokenizer(tmp_path)
    assert [entry["tokenizer_class"] for entry in logs if entry["event"] == "tokenizer.auto_fallback"] == [
        "LlamaForCausalLM"
    ]
    del config["tokenizer_class"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with capture_logs() as logs:
        tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode(TEXT) == load_tokenizer(smollm2_tokenizer_dir).encode(TEXT)
    assert any(entry["event"] == "tokenizer.auto_fallback" for entry in logs)
