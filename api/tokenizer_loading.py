"""Load a model's tokenizer in the edge without transformers.

The edge needs a tokenizer and a chat template, nothing of transformers' model code: a directory with
`tokenizer.json` (every directory transformers saves, GGUF conversions included) loads on the `tokenizers`
library and renders chat templates with jinja2 (api/fast_tokenizer.py, api/chat_template.py). transformers is not
imported at all: its tokenizer stack alone costs the api process ~40-46 MiB. Only a directory without
`tokenizer.json` (a SentencePiece `tokenizer.model` or `vocab.json` + `merges.txt` that transformers converts)
falls back to transformers' own loading, logged because it costs; a directory naming its tokenizer class loads
that class only (never `AutoTokenizer`'s model config, which imports torch), and `AutoTokenizer` is the last resort.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from api.fast_tokenizer import FastTokenizer

log = structlog.get_logger(__name__)

_CLASS_SUFFIXES = ("Tokenizer", "TokenizerFast", "TokenizersBackend")


def load_tokenizer(directory: Path):
    if (directory / "tokenizer.json").is_file():
        return FastTokenizer.from_directory(directory)
    return _load_with_transformers(directory)


def _load_with_transformers(directory: Path):
    log.warning(
        "tokenizer.transformers_fallback",
        directory=str(directory),
        detail="no tokenizer.json: transformers converts the tokenizer, and its import stays in the api process",
    )
    import transformers
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    name = _tokenizer_class_name(directory)
    # Only tokenizer class names: any other attribute of `transformers` could import model code.
    cls = getattr(transformers, name, None) if name and name.endswith(_CLASS_SUFFIXES) else None
    if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase):
        return cls.from_pretrained(directory)
    log.warning(
        "tokenizer.auto_fallback",
        directory=str(directory),
        tokenizer_class=name,
        detail="AutoTokenizer imports torch and the model config code into the api process",
    )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _tokenizer_class_name(directory: Path) -> str | None:
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None
