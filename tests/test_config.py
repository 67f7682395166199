from pathlib import Path

import pytest

from aicc.config import load_settings
from aicc.errors import ConfigError


def test_defaults() -> None:
    settings = load_settings()
    assert settings.max_batch_size == 32
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080


def test_precedence_flags_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "aicc.yaml"
    config.write_text("port: 9001\nmax_batch_size: 8\nctx_size: 4096\n")
    monkeypatch.setenv("AICC_MAX_BATCH_SIZE", "16")
    settings = load_settings(config, port=None, ctx_size=2048)
    assert settings.port == 9001  # file
    assert settings.max_batch_size == 16  # env beats file
    assert settings.ctx_size == 2048  # flag beats everything


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "aicc.yaml"
    config.write_text("threads: 3\n")
    monkeypatch.setenv("AICC_CONFIG", str(config))
    assert load_settings().threads == 3


def test_invalid_value_names_setting_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"max_batch_size=0"):
        load_settings(max_batch_size=0)
    monkeypatch.setenv("AICC_PORT", "seventy")
    with pytest.raises(ConfigError, match=r"port=seventy"):
        load_settings()


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "aicc.yaml"
    config.write_text("max_batch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_batch_sise'"):
        load_settings(config)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [unclosed\n")
    with pytest.raises(ConfigError):
        load_settings(bad)


def test_contradictory_settings() -> None:
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        load_settings(max_batch_size=64, max_batch_tokens=32)


def test_prefix_slots_fit_llama_cpp_sequence_limit() -> None:
    with pytest.raises(ConfigError, match="prefix_cache_entries"):
        load_settings(max_batch_size=240, max_batch_tokens=256, prefix_cache_entries=32)
    settings = load_settings(max_batch_size=32, prefix_cache_entries=32)
    assert settings.num_prefix_slots == 64, "cached prefixes + one shared prompt per slot"
    wide = load_settings(max_batch_size=200, max_batch_tokens=256, prefix_cache_entries=56)
    assert wide.num_prefix_slots == 56
    assert load_settings(batch_invariant=True).num_prefix_slots == 0
    with pytest.raises(ConfigError, match="prefix_cache_scope"):
        load_settings(prefix_cache_scope="everyone")
