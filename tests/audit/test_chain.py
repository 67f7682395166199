"""Pure logic: canonical JSON, entry building, content sealing, signed checkpoint lines."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from aicc.audit.chain import GENESIS_HASH, canonical_json, format_time, link_hash, sanitize
from aicc.audit.checkpoints import Checkpoint, CheckpointFile
from aicc.audit.entries import (
    CONTENT_KEY_ENV,
    AuditEntry,
    ContentCipher,
    entry_from_call,
    event_entry,
    load_content_cipher,
    recovered_entry,
)
from aicc.config import load_settings
from aicc.errors import ConfigError
from tests.audit.conftest import SECRET, make_call, make_principal

KEY_HEX = "11" * 32


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert (
        canonical_json({"b": 1, "a": "é", "c": [1, None]})
        == '{"a":"é","b":1,"c":[1,null]}'.encode()
    )
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_json({"x": float("nan")})


def test_times_are_utc_with_microseconds() -> None:
    beijing = timezone(timedelta(hours=8))
    assert format_time(datetime(2025, 3, 1, 20, 0, 0, 5, tzinfo=beijing)) == (
        "2025-03-01T12:00:00.000005Z"
    )
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2025, 1, 1))


def test_entry_from_call_takes_every_field() -> None:
    record, outcome = make_call(detail={"changed": ("a", "b")})
    entry = entry_from_call(record, outcome)
    assert entry.seq == 0
    assert entry.action == "api.call"
    assert entry.time == datetime.fromtimestamp(record.started_at, UTC)
    assert (entry.username, entry.user_id, entry.key_id, entry.session_id) == (
        "alice",
        7,
        "key_0123456789ab",
        None,
    )
    assert entry.roles == ("user",)
    assert (entry.method, entry.route, entry.path, entry.status) == (
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        200,
    )
    assert entry.latency_ms == 12.346
    assert (entry.prompt_tokens, entry.completion_tokens, entry.finish_reason) == (12, 5, "stop")
    assert entry.body_sha256 == "ab" * 32
    assert entry.detail == {"changed": ["a", "b"]}
    assert entry.prompt_enc is None


def test_session_principal_and_anonymous_calls() -> None:
    record, outcome = make_call(username=None, status=401)
    entry = entry_from_call(record, outcome)
    assert (entry.username, entry.key_id, entry.roles) == (None, None, ())
    record.principal = make_principal(via="session")
    entry = entry_from_call(record, outcome)
    assert (entry.key_id, entry.session_id) == (None, "ses_0123456789ab")


def test_values_are_cleaned_to_round_trip_through_any_database() -> None:
    record, outcome = make_call(path="/v1/x\x00" + "y" * 5000)
    entry = entry_from_call(record, outcome)
    assert entry.path is not None
    assert len(entry.path) == 2048
    assert "\x00" not in entry.path
    with pytest.raises(TypeError):
        event_entry(action="x", principal=None, detail={"raw": b"bytes"})


def test_hash_covers_every_field_and_the_link() -> None:
    entry = entry_from_call(*make_call()).chained(1, GENESIS_HASH)
    assert entry.hash == entry.compute_hash()
    assert entry.hash == link_hash(GENESIS_HASH, entry.hashed_fields())
    for change in ({"status": 201}, {"seq": 2}, {"username": "mallory"}, {"roles": ("admin",)}):
        assert replace(entry, **change).compute_hash() != entry.hash
    assert replace(entry, prev_hash="1" * 64).compute_hash() != entry.hash


def test_entries_round_trip_through_json() -> None:
    entry = entry_from_call(*make_call(detail={"k": 1})).chained(3, "f" * 64)
    again = AuditEntry.from_row(json.loads(json.dumps(entry.to_json())))
    assert again == entry
    assert again.compute_hash() == entry.hash


def test_recovered_entry_has_unknown_status() -> None:
    opened = entry_from_call(*make_call(status=200, is_stream=True))
    recovered = recovered_entry(opened.to_json())
    assert (recovered.action, recovered.status, recovered.latency_ms) == (
        "audit.recovered",
        0,
        None,
    )
    assert recovered.request_id == opened.request_id
    assert recovered.detail is not None
    assert "stopped" in recovered.detail["reason"]


def test_content_is_sealed_per_entry() -> None:
    cipher = ContentCipher(bytes.fromhex(KEY_HEX))
    record, outcome = make_call(prompt="secret plans", completion=("sure", ", here"))
    entry = entry_from_call(record, outcome, cipher=cipher)
    assert entry.prompt_enc is not None
    assert entry.completion_enc is not None
    assert "secret" not in entry.prompt_enc
    assert cipher.open(entry.prompt_enc, record.request_id, "prompt") == "secret plans"
    assert cipher.open(entry.completion_enc, record.request_id, "completion") == "sure, here"
    with pytest.raises(ValueError, match="does not open"):
        cipher.open(entry.prompt_enc, "another-request", "prompt")
    with pytest.raises(ValueError, match="does not open"):
        ContentCipher(b"\x22" * 32).open(entry.prompt_enc, record.request_id, "prompt")


def test_content_key_is_required_when_capture_is_on(tmp_path: Path) -> None:
    off = load_settings(state_dir=tmp_path)
    assert load_content_cipher(off, environ={}) is None
    on = load_settings(state_dir=tmp_path, audit_capture_content=True)
    with pytest.raises(ConfigError, match="no key"):
        load_content_cipher(on, environ={})
    assert load_content_cipher(on, environ={CONTENT_KEY_ENV: KEY_HEX}) is not None
    with pytest.raises(ConfigError, match="64 hex"):
        load_content_cipher(on, environ={CONTENT_KEY_ENV: "abcd"})
    key_file = tmp_path / "content.key"
    key_file.write_text(KEY_HEX + "\n")
    key_file.chmod(0o644)
    with_file = load_settings(
        state_dir=tmp_path, audit_capture_content=True, audit_content_key_file=key_file
    )
    with pytest.raises(ConfigError, match="chmod 600"):
        load_content_cipher(with_file, environ={})
    key_file.chmod(0o600)
    assert load_content_cipher(with_file, environ={}) is not None


def _checkpoint(seq: int) -> Checkpoint:
    return Checkpoint(seq, "a" * 64, seq, datetime.now(UTC), "periodic")


def test_checkpoint_lines_are_signed(tmp_path: Path) -> None:
    path = tmp_path / "cp.jsonl"
    checkpoints = CheckpointFile(path, SECRET)
    checkpoints.append(_checkpoint(5))
    checkpoints.append(_checkpoint(10))
    assert path.stat().st_mode & 0o077 == 0
    lines = checkpoints.read()
    assert [line.checkpoint.seq for line in lines if line.checkpoint] == [5, 10]
    assert all(line.is_authentic for line in lines)
    assert checkpoints.latest() == lines[-1].checkpoint
    assert not any(line.is_authentic for line in CheckpointFile(path, b"x" * 32).read())


@pytest.mark.parametrize(
    ("field", "value"),
    [("hash", "b" * 64), ("seq", 6), ("count", 1), ("reason", "purge"), ("time", "2020-01-01")],
)
def test_an_edited_checkpoint_line_is_not_authentic(
    tmp_path: Path, field: str, value: object
) -> None:
    path = tmp_path / "cp.jsonl"
    CheckpointFile(path, SECRET).append(_checkpoint(5))
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data) + "\n{not json\n")
    first, garbled = CheckpointFile(path, SECRET).read()
    assert not first.is_authentic
    assert first.claimed_seq == data["seq"]
    assert (garbled.is_authentic, garbled.checkpoint, garbled.claimed_seq) == (False, None, None)


def test_sanitize_turns_infinities_into_strings() -> None:
    # JSON's Infinity/NaN literals in a client's body reach an admin call's detail.
    detail = json.loads('{"w": {"a": Infinity, "b": -Infinity, "c": NaN, "d": 1.5}, "e": 1e400}')
    clean = sanitize(detail)
    assert clean == {"w": {"a": "inf", "b": "-inf", "c": "nan", "d": 1.5}, "e": "inf"}
    assert canonical_json(clean)  # strict JSON: would raise on a non-finite float
