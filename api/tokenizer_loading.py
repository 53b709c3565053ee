"""Load a model's tokenizer in the edge without transformers' model code.

`AutoTokenizer` reads the model's config first (`AutoConfig`), and that imports torch and the rope utilities:
some 220 MB resident in every api process, which never runs a model. The tokenizer directory a worker publishes
names its class in tokenizer_config.json, and transformers resolves a tokenizer class by importing only that
class's module (the `tokenizers` backend, tokenization_llama, ...), without torch. Only a directory that names no
tokenizer class, or one this transformers does not have, falls back to `AutoTokenizer` (logged, since it costs).
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_CLASS_SUFFIXES = ("Tokenizer", "TokenizerFast", "TokenizersBackend")


def load_tokenizer(directory: Path):
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
