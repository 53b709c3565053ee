"""The embedding-only engine on the packaged all-MiniLM-L6-v2, against an independent computation."""

from __future__ import annotations

import pytest
import torch

from common.models import PACKAGED_MODELS, packaged_model
from contracts import EmbedRequest, GenerateRequest
from engine_worker.encoder import EncoderEngine, is_encoder_model
from engine_worker.pooling import pool
from engine_worker.validation import resolve_layer


@pytest.fixture(scope="module")
def minilm_dir():
    return packaged_model(PACKAGED_MODELS["all-MiniLM-L6-v2"])


@pytest.fixture(scope="module")
def engine(minilm_dir) -> EncoderEngine:
    return EncoderEngine(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def embed(engine: EncoderEngine, inputs: list[list[int]], **fields) -> list:
    request = EmbedRequest(request_id="e", model="m", inputs=inputs, reply_subject="x", **fields)
    engine.validate(request)
    [output] = engine.embed([request])
    return output


def test_mean_pooled_normalised_vectors_match_a_plain_forward(engine, tokenizer, minilm_dir) -> None:
    from transformers import AutoModel

    texts = ["A cat sits on the mat.", "Queues make inference durable across many machines."]
    inputs = [tokenizer.encode(text) for text in texts]
    output = embed(engine, inputs)
    reference_model = AutoModel.from_pretrained(minilm_dir).eval()
    for index, tokens in enumerate(inputs):
        with torch.no_grad():
            hidden = reference_model(torch.tensor([tokens])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        got = torch.tensor(output.vectors[index].values)
        assert torch.allclose(got, expected, atol=1e-4)  # padding in the batch changed nothing
    assert output.usage.prompt_tokens == sum(map(len, inputs))


def test_similar_sentences_are_closer(engine, tokenizer) -> None:
    texts = ["The cat sleeps on the sofa.", "A kitten is napping on the couch.", "Stock markets fell sharply today."]
    vectors = [torch.tensor(v.values) for v in embed(engine, [tokenizer.encode(t) for t in texts]).vectors]
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_layers_and_poolings(engine, tokenizer) -> None:
    output = embed(engine, [tokenizer.encode("hello world")], layers=[0, -1], pooling=["max", "none"], normalize=False)
    keys = [(v.layer, v.pooling) for v in output.vectors]
    assert keys == [(0, "max"), (0, "none"), (6, "max"), (6, "none")]
    per_token = output.vectors[1].values
    assert len(per_token) == len(tokenizer.encode("hello world")) and len(per_token[0]) == 384


def test_generation_and_bad_layers_are_refused(engine) -> None:
    with pytest.raises(ValueError, match="embedding model"):
        engine.validate(GenerateRequest(request_id="g", model="m", prompt_token_ids=[1], reply_subject="x"))
    with pytest.raises(ValueError, match="layer 9"):
        engine.validate(EmbedRequest(request_id="e", model="m", inputs=[[101]], layers=[9], reply_subject="x"))


def test_pooling_modes() -> None:
    hidden = torch.tensor([[1.0, -5.0], [3.0, 2.0]])
    assert pool(hidden, "mean").tolist() == [2.0, -1.5]
    assert pool(hidden, "max").tolist() == [3.0, 2.0]
    assert pool(hidden, "last_token").tolist() == [3.0, 2.0]
    assert pool(hidden, "abs_max").tolist() == [3.0, -5.0]
    assert resolve_layer(-1, 30) == 30 and resolve_layer(0, 30) == 0


def test_encoder_detection(engine, minilm_dir, tiny_model_dir) -> None:
    assert is_encoder_model(minilm_dir)
    assert not is_encoder_model(tiny_model_dir)
