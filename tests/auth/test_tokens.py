from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from aicc.auth import tokens
from aicc.config import load_settings
from aicc.errors import ConfigError

SECRET = b"s" * 32


def test_token_formats() -> None:
    key, token = tokens.new_api_key(), tokens.new_session_token()
    assert re.fullmatch(r"aicc-sk-[A-Za-z0-9_-]{43}", key)
    assert re.fullmatch(r"aicc-st-[A-Za-z0-9_-]{43}", token)
    assert tokens.is_key_id(tokens.new_key_id())
    assert tokens.is_session_id(tokens.new_session_id())
    assert tokens.token_hint(key) == key[:12] + "…"
    assert tokens.new_api_key() != key


@pytest.mark.parametrize(
    "value",
    [
        "",
        "aicc-sk-" + "a" * 300,
        "aicc-sk-abc def",
        "' OR 1=1 --",
        "*)(uid=*",
        "aicc-sk-ünïcode",
        "short",
        "a" * 31,
    ],
)
def test_implausible_keys_are_refused(value: str) -> None:
    assert not tokens.is_api_key(value)


def test_plausible_tokens() -> None:
    assert tokens.is_api_key(tokens.new_api_key())
    assert tokens.is_api_key("b" * 32)  # an operator-chosen bootstrap key
    assert not tokens.is_api_key(tokens.new_session_token())
    assert tokens.is_session_token(tokens.new_session_token())
    assert not tokens.is_session_token(tokens.new_api_key())


def test_keyed_hash_depends_on_secret_and_whole_token() -> None:
    key = tokens.new_api_key()
    digest = tokens.keyed_hash(SECRET, key)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == tokens.keyed_hash(SECRET, key)
    assert digest != tokens.keyed_hash(b"t" * 32, key)
    assert digest != tokens.keyed_hash(SECRET, key[:-1])
    assert tokens.hashes_equal(digest, digest)
    flipped = digest[:-1] + ("1" if digest[-1] == "0" else "0")
    assert not tokens.hashes_equal(digest, flipped)


def test_secret_file_is_created_private_and_reused(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    secret = tokens.load_server_secret(settings)
    path = tmp_path / "state" / "secret.key"
    assert len(secret) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert tokens.load_server_secret(settings) == secret


def test_group_readable_secret_file_is_refused(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    tokens.load_server_secret(settings)
    os.chmod(tmp_path / "secret.key", 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        tokens.load_server_secret(settings)


@pytest.mark.parametrize("content", ["not hex at all", "abcd"])
def test_bad_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret.key"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="secret"):
        tokens.load_server_secret(load_settings(state_dir=tmp_path))


def test_configured_secret_wins(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path, secret_key="k" * 40)
    assert tokens.load_server_secret(settings) == b"k" * 40
    assert not (tmp_path / "secret.key").exists()


def test_seal_round_trip_and_tamper_detection() -> None:
    sealed = tokens.seal(SECRET, b"JBSWY3DPEHPK3PXP", context=b"user:1")
    assert b"JBSWY3DPEHPK3PXP" not in sealed.encode()
    assert tokens.open_sealed(SECRET, sealed, context=b"user:1") == b"JBSWY3DPEHPK3PXP"
    assert tokens.seal(SECRET, b"x", context=b"user:1") != tokens.seal(
        SECRET, b"x", context=b"user:1"
    )  # fresh nonce each time
    with pytest.raises(tokens.SealError):
        tokens.open_sealed(SECRET, sealed, context=b"user:2")
    with pytest.raises(tokens.SealError):
        tokens.open_sealed(b"t" * 32, sealed, context=b"user:1")
    flipped = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    with pytest.raises(tokens.SealError):
        tokens.open_sealed(SECRET, flipped, context=b"user:1")
    with pytest.raises(tokens.SealError):
        tokens.open_sealed(SECRET, "%%%", context=b"user:1")
