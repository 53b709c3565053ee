"""EngineConfig is the one declaration of the engine's knobs: Settings takes its defaults and bounds over and
builds it, and the cross-field check runs when it does."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from common.engine_config import EngineConfig
from common.settings import Settings


def test_settings_build_the_engine_config_with_its_defaults() -> None:
    assert asdict(Settings().engine_config()) == asdict(EngineConfig())
    config = Settings(max_num_seqs=3, num_speculative_tokens=0).engine_config()
    assert (config.max_num_seqs, config.num_speculative_tokens) == (3, 0)
    assert Settings().engine_config().prefix_caching is True
    assert Settings(prefix_caching=False).engine_config().prefix_caching is False
    assert Settings(prefix_cache_max_mib=48).engine_config().prefix_cache_max_mib == 48


def test_settings_and_engine_share_every_bound() -> None:
    # The engine runs with budgets as small as the oracle's 7 tokens; the settings used to demand 16.
    assert Settings(max_num_batched_tokens=7).engine_config().max_num_batched_tokens == 7
    for name, bad in (
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", 0),
        ("speculative_max_rows", 1),
        ("num_speculative_tokens", -1),
        ("device", "tpu"),
        ("prefix_cache_max_mib", 0),
    ):
        with pytest.raises(ValueError, match=name):
            Settings(**{name: bad})
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: bad})


def test_cross_field_bounds_are_checked_when_settings_build_the_config() -> None:
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        Settings(prompt_lookup_min=5, prompt_lookup_max=4).engine_config()
