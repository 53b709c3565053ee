"""The edge's tokenizer on `tokenizers` alone (api/fast_tokenizer.py) gives what transformers' tokenizer gives from
the same directory: vocabulary size, special tokens and their ids, encode (with and without the post-processor's
special tokens), decode (with and without special tokens, and the edge's incremental split into token pieces),
token strings and the exported tokenizer.json. Directories: the real SmolLM2 tokenizer, the sim worker's, and
ones written to reach the rest of transformers' loading (special tokens tokenizer.json lacks, a post-processor
adding a BOS, a legacy special_tokens_map.json, decode clean-up on a word-level model)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from api.fast_tokenizer import FastTokenizer
from api.serving.token_pieces import split_into_tokens

TEXTS = [
    "Hello world, 1234 tokens\nand émojis 🎉",
    "Grüße, wie geht's?  Tabs\tand  double  spaces ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # special tokens written as text
    "<|tool|> call <|note|> and <|endoftext|>",
    "日本語のテキスト、 and Ωmega ≠ omega … 💡💡",
    "Don't stop . Really ? I 'm sure , it 's fine",
    "",
    " ",
]


def _word_level_dir(target: Path) -> Path:
    """A word-level tokenizer that asks for decode clean-up (transformers applies it to non-BPE models only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Don't", "stop", ".", "Really", "?", "I", "'m", "sure", ",", "it", "'s", "fine"]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", clean_up_tokenization_spaces=True
    )
    tokenizer.save_pretrained(target)
    return target


def _with_more_specials(smollm2: Path, target: Path) -> Path:
    """SmolLM2 plus: a post-processor that prepends the BOS, an extra special token and a model-specific named one
    that the vocabulary lacks, an added non-special token, the EOS in the AddedToken dict form."""
    shutil.copytree(smollm2, target)
    data = json.loads((target / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (target / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((target / "tokenizer_config.json").read_text())
    next_id = len(data["model"]["vocab"])
    config.update(
        {
            "extra_special_tokens": ["<|tool|>"],
            "boi_token": "<|image|>",
            "eos_token": {
                "__type": "AddedToken",
                "content": "<|im_end|>",
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            },
            "added_tokens_decoder": {
                str(next_id): {
                    "content": "<|note|>",
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                    "special": False,
                },
            },
        }
    )
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def _legacy_special_tokens_map(smollm2: Path, target: Path) -> Path:
    """An older save: special tokens in special_tokens_map.json (dict form), extras as additional_special_tokens."""
    shutil.copytree(smollm2, target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        config.pop(key, None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    token = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (target / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|endoftext|>", **token},
                "eos_token": {"content": "<|im_end|>", **token},
                "unk_token": "<|endoftext|>",
                "additional_special_tokens": ["<|extra|>", "<|im_start|>"],
            }
        )
    )
    return target


@pytest.fixture(scope="module", params=["smollm2", "sim", "more_specials", "legacy_map", "word_level"])
def pair(request, smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from engine_worker.sim import write_sim_tokenizer

    target = tmp_path_factory.mktemp(request.param) / "tokenizer"
    directory = {
        "smollm2": lambda: smollm2_tokenizer_dir,
        "sim": lambda: write_sim_tokenizer(target, 300),
        "more_specials": lambda: _with_more_specials(smollm2_tokenizer_dir, target),
        "legacy_map": lambda: _legacy_special_tokens_map(smollm2_tokenizer_dir, target),
        "word_level": lambda: _word_level_dir(target),
    }[request.param]()
    return request.param, FastTokenizer.from_directory(directory), AutoTokenizer.from_pretrained(directory)


def _texts(name: str) -> list[str]:
    if name == "sim":
        return ["w10 w11 w250", "w0  w299\nw3", "<s> w5 </s> w7", ""]
    return TEXTS


def test_vocabulary_and_special_tokens(pair) -> None:
    _, ours, theirs = pair
    assert len(ours) == len(theirs)
    assert ours.special_tokens_map == theirs.special_tokens_map
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    added = {i: (t.content, t.special) for i, t in theirs.added_tokens_decoder.items()}
    assert {i: (t.content, t.special) for i, t in ours.backend_tokenizer.get_added_tokens_decoder().items()} == added


def test_encode(pair) -> None:
    name, ours, theirs = pair
    for text in _texts(name):
        for add_special_tokens in (True, False):
            expected = theirs.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, (text, add_special_tokens)
        assert ours.convert_ids_to_tokens(expected) == theirs.convert_ids_to_tokens(expected)
    if name == "more_specials":  # the written-in tokens are really reached
        ids = ours.encode(TEXTS[3])
        assert ids[0] == 1 and ours.token_to_id("<|tool|>") in ids and ours.token_to_id("<|note|>") in ids


def test_decode(pair) -> None:
    name, ours, theirs = pair
    rng = random.Random(0)
    size = len(theirs)
    added = sorted(theirs.added_tokens_decoder)
    sequences = [theirs.encode(text) for text in _texts(name)]
    sequences += [[rng.randrange(size) for _ in range(rng.randint(1, 8))] for _ in range(300)]
    sequences += [[token] for token in range(0, size, max(1, size // 500))] + [added, [*added, 5, 6]]
    for ids in sequences:
        for skip in (False, True):
            expected = theirs.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected, (ids, skip)
    if name == "word_level":  # the clean-up is really applied (and so tested above)
        assert ours.decode(ours.encode("Don't stop . Really ?")) == "Don't stop. Really?"


def test_incremental_pieces(pair) -> None:
    """The edge's incremental detokenization (Aleph Alpha's completion tokens, prompt tokens) with each."""
    name, ours, theirs = pair
    for text in _texts(name):
        ids = theirs.encode(text, add_special_tokens=False)
        for skip in (False, True):
            decoded = theirs.decode(ids, skip_special_tokens=skip)
            context = ids[:3]
            expected = split_into_tokens(theirs, ids[3:], decoded, context=context, skip_special_tokens=skip)
            assert split_into_tokens(ours, ids[3:], decoded, context=context, skip_special_tokens=skip) == expected


def test_the_exported_tokenizer_json_tokenizes_the_same(pair) -> None:
    """`/models/{model}/tokenizer` serves `backend_tokenizer.to_str()` (what aleph-alpha-client loads)."""
    from tokenizers import Tokenizer

    name, ours, theirs = pair
    exported = (Tokenizer.from_str(t.backend_tokenizer.to_str()) for t in (ours, theirs))
    mine, reference = exported
    for text in _texts(name):
        assert mine.encode(text).ids == reference.encode(text).ids


def test_special_tokens_reach_chat_templates(pair) -> None:
    _, ours, theirs = pair
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ boi_token }}|{{ messages }}"
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, chat_template=template) == theirs.apply_chat_template(
        messages, chat_template=template, tokenize=False
    )
