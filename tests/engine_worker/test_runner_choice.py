"""Which model path runs a model, what the generic path refuses at load (naming the feature), and that the fast
and the generic path agree on the llama layout (greedy and seeded sampling, same tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_worker.engine import Engine, EngineConfig
from engine_worker.generic_attention import UnsupportedModelFeature, engine_attention
from engine_worker.generic_runner import check_generic_support
from engine_worker.runner_factory import choose_model_impl
from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion, tokens_by_choice


def _config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **fields)


def test_auto_keeps_the_fast_path_for_the_llama_layout_and_sends_the_rest_to_the_generic_one() -> None:
    llama = _config("llama", architectures=["LlamaForCausalLM"], max_position_embeddings=4096)
    assert choose_model_impl(llama) == "fast"
    assert choose_model_impl(llama, "generic") == "generic"
    windowed = _config(
        "mistral", architectures=["MistralForCausalLM"], sliding_window=1024, max_position_embeddings=4096
    )
    assert choose_model_impl(windowed) == "generic"  # the fast path would cap the context at the window
    assert choose_model_impl(windowed, max_model_len=1024) == "fast"  # the window covers the whole context
    assert choose_model_impl(_config("qwen3", architectures=["Qwen3ForCausalLM"])) == "generic"
    with pytest.raises(ValueError, match="model_impl"):
        choose_model_impl(llama, "fastest")


@pytest.mark.parametrize(
    ("model_type", "fields", "feature"),
    [
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic NTK"),
        ("llama4_text", {"attention_chunk_size": 8192}, "chunked local attention"),
        ("t5", {}, "encoder-decoder"),
    ],
)
def test_the_generic_path_refuses_what_it_cannot_run_by_name(model_type, fields, feature) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _config(model_type, **fields)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), torch.nn.Module)
    with pytest.raises(ValueError, match=feature):
        check_generic_support(config, model_class)


def test_a_model_without_the_attention_interface_is_refused() -> None:
    class OldStyle(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="attention interface"):
        check_generic_support(_config("llama"), OldStyle)


def test_an_attention_argument_the_engine_does_not_implement_is_named() -> None:
    module = torch.nn.Module()
    module.layer_idx = 0
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(UnsupportedModelFeature, match="'chunk_size'"):
        engine_attention(module, q, q, q, None, chunk_size=4, inferq_step=object())


def _generate(model_dir: Path, impl: str, **sampling) -> dict[str, list[int]]:
    engine = Engine.from_pretrained(
        model_dir,
        EngineConfig(dtype="float32", device="cpu", torch_threads=1, model_impl=impl, max_num_batched_tokens=16),
    )
    assert type(engine.runner).__name__ == {"fast": "ModelRunner", "generic": "GenericRunner"}[impl]
    for i in range(3):
        engine.add_request(make_request(f"r{i}", prompt_of(10 + 9 * i, i), max_tokens=20, ignore_eos=True, **sampling))
    return {rid: tokens_by_choice(outputs)[0] for rid, outputs in run_to_completion(engine).items()}


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 3, "top_p": 0.9}])
def test_fast_and_generic_paths_give_the_same_tokens_on_llama(tiny_model_dir: Path, sampling) -> None:
    assert _generate(tiny_model_dir, "fast", **sampling) == _generate(tiny_model_dir, "generic", **sampling)


def test_the_setting_reaches_the_engine_config() -> None:
    """The worker builds EngineConfig from the Settings fields of the same name (engine_worker/main.py)."""
    from dataclasses import fields

    from common.settings import Settings

    assert "model_impl" in {f.name for f in fields(EngineConfig)} & set(Settings.model_fields)
    assert Settings(model_impl="generic").model_impl == "generic"
    with pytest.raises(ValueError, match="model_impl"):
        Settings(model_impl="fastest")
