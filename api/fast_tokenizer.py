"""A model's tokenizer in the edge on the `tokenizers` library alone: the directory's `tokenizer.json`, its named
special tokens and its chat templates, behind the part of transformers' tokenizer interface the edge uses
(`encode`, `decode`, `convert_ids_to_tokens`, `len()`, `chat_template`, `apply_chat_template`,
`backend_tokenizer`, the special tokens and their ids).

transformers builds the same tokenizer from the same files (its generic `TokenizersBackend` /
`PreTrainedTokenizerFast`: tokenizer.json as the pipeline, special tokens from tokenizer_config.json); importing
its tokenizer stack costs the api process ~40-46 MiB it never needs. What it does on top of tokenizer.json is
reproduced here (and pinned by tests/api/test_fast_tokenizer.py and test_chat_template_equivalence.py):
- truncation and padding baked into tokenizer.json are switched off (the edge encodes whole prompts);
- named special tokens and `extra_special_tokens` that tokenizer.json does not list as added tokens are added as
  special tokens (they then never split and `skip_special_tokens` drops them), as are the config's
  `added_tokens_decoder` entries it lacks;
- `clean_up_tokenization_spaces` from the config applies to decode, except for BPE models (transformers skips it
  there: it would delete real spaces before punctuation).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from api.chat_template import render_chat_template, select_template

# transformers' named special tokens; a config may name more (`*_token` keys, a dict of `extra_special_tokens`).
STANDARD_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class FastTokenizer:
    def __init__(
        self,
        backend: Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        chat_template: str | Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces

    @classmethod
    def from_directory(cls, directory: Path) -> FastTokenizer:
        """The tokenizer of a directory holding `tokenizer.json` (as transformers `save_pretrained` writes it)."""
        config = _read_json(directory / "tokenizer_config.json")
        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        backend.no_truncation()
        backend.no_padding()
        named, extra = _special_tokens(config, _read_json(directory / "special_tokens_map.json"))
        _add_missing_tokens(backend, _config_added_tokens(config), (*named.values(), *extra))
        clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        return cls(
            backend,
            special_tokens={name: token.content for name, token in named.items()},
            chat_template=_chat_templates(directory, config),
            clean_up_tokenization_spaces=clean_up,
        )

    # --- vocabulary ------------------------------------------------------------------------------------------------
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._backend

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens (`bos_token`: `<s>`, ...), also given to chat templates."""
        return dict(self._special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        found = self._backend.token_to_id(token)
        if found is None and token != self._special_tokens.get("unk_token"):
            return self.token_to_id(self._special_tokens.get("unk_token"))
        return found

    bos_token = property(lambda self: self._special_tokens.get("bos_token"))
    eos_token = property(lambda self: self._special_tokens.get("eos_token"))
    pad_token = property(lambda self: self._special_tokens.get("pad_token"))
    unk_token = property(lambda self: self._special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self.token_to_id(self.bos_token))
    eos_token_id = property(lambda self: self.token_to_id(self.eos_token))
    pad_token_id = property(lambda self: self.token_to_id(self.pad_token))
    unk_token_id = property(lambda self: self.token_to_id(self.unk_token))

    # --- text <-> ids ------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`add_special_tokens`: what the tokenizer's post-processor adds around a text (a BOS for some models)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """The vocabulary's strings (`ĠParis`); None for an id outside it."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(token)) for token in ids]

    # --- chat ------------------------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """transformers' `apply_chat_template` for one conversation: the rendered text (`tokenize=False`, what the
        edge uses), or its ids (`tokenize=True`, without the post-processor's special tokens: the template writes
        its own). `chat_template`: the name of one of the model's templates, or a template's text."""
        if isinstance(self.chat_template, Mapping) and chat_template in self.chat_template:
            template = self.chat_template[chat_template]
        else:
            template = chat_template or select_template(self.chat_template, tools=tools)
        rendered = render_chat_template(
            template,
            conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            variables={**self._special_tokens, **template_kwargs},
        )
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


# --- reading a directory -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _added_token(value: Any, *, special: bool | None = None) -> AddedToken | None:
    """A token as configs write it: a string, or an AddedToken's fields (`{"content": ..., "lstrip": ...}`)."""
    if isinstance(value, str):
        return AddedToken(value, special=True if special is None else special)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        fields = {key: value[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in value}
        flag = value.get("special", True) if special is None else special
        return AddedToken(value["content"], special=bool(flag), **fields)
    return None


def _special_tokens(config: Mapping[str, Any], legacy_map: Mapping[str, Any]) -> tuple[dict[str, AddedToken], list]:
    """The named special tokens and the unnamed extra ones. special_tokens_map.json is read only for a config
    without `added_tokens_decoder` (older saves), and then overrides it, as in transformers."""
    values = dict(config)
    if "added_tokens_decoder" not in config:
        values.update(legacy_map)
    names = [*STANDARD_SPECIAL_TOKENS]
    # Model-specific named tokens (Gemma 3's `boi_token`, ...): `*_token` keys holding a string.
    names += [key for key, value in config.items() if key.endswith("_token") and isinstance(value, str)]
    named: dict[str, AddedToken] = {}
    for name in dict.fromkeys(names):
        token = _added_token(values.get(name), special=True)
        if token is not None:
            named[name] = token
    extra = values.get("extra_special_tokens", values.get("additional_special_tokens")) or []
    if isinstance(extra, Mapping):  # a dict of named extra tokens
        named.update({name: token for name, value in extra.items() if (token := _added_token(value, special=True))})
        extra = []
    return named, [token for value in extra if (token := _added_token(value, special=True)) is not None]


def _config_added_tokens(config: Mapping[str, Any]) -> list[AddedToken]:
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, Mapping):
        return []
    ordered = sorted(decoder.items(), key=lambda item: int(item[0]))
    return [token for _, value in ordered if (token := _added_token(value)) is not None]


def _add_missing_tokens(backend: Tokenizer, added: list[AddedToken], special: Iterable[AddedToken]) -> None:
    """Add what transformers adds at load: the config's added tokens, then every special token tokenizer.json
    does not already have as an added token (a token in the base vocabulary keeps its id)."""
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [token for token in added if token.content not in present]
    present |= {token.content for token in missing}
    for token in special:
        if token.content not in present:
            missing.append(token)
            present.add(token.content)
    if missing:
        backend.add_tokens(missing)


def _chat_templates(directory: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The model's chat template(s): chat_template.jinja and additional_chat_templates/*.jinja take priority
    over the config's `chat_template` (a text, or a list of named ones)."""
    templates: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    configured = config.get("chat_template")
    if isinstance(configured, list):
        return {item["name"]: item["template"] for item in configured if isinstance(item, Mapping)}
    return configured if isinstance(configured, str) else None


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: spaces a word-piece decode leaves before punctuation and clitics."""
    for spaced, joined in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(spaced, joined)
    return text
