from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import pytest

from aicc.auth import totp

NOW = datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC)


def test_secret_and_uri() -> None:
    secret = totp.new_secret()
    assert len(secret) >= 32
    uri = urlparse(totp.provisioning_uri(secret, "alice@example.org"))
    assert uri.scheme == "otpauth"
    assert uri.netloc == "totp"
    assert "alice" in uri.path
    assert parse_qs(uri.query)["secret"] == [secret]
    assert parse_qs(uri.query)["issuer"] == ["aicc"]


@pytest.mark.parametrize("offset_s", [-30, 0, 30])
def test_codes_within_one_step_are_accepted(offset_s: int) -> None:
    secret = totp.new_secret()
    code = totp.code_at(secret, NOW + timedelta(seconds=offset_s))
    assert totp.accepted_step(secret, code, now=NOW, last_step=None) == totp.time_step(
        NOW + timedelta(seconds=offset_s)
    )


@pytest.mark.parametrize("offset_s", [-90, 90])
def test_codes_outside_the_window_are_refused(offset_s: int) -> None:
    secret = totp.new_secret()
    code = totp.code_at(secret, NOW + timedelta(seconds=offset_s))
    assert totp.accepted_step(secret, code, now=NOW, last_step=None) is None


def test_a_used_step_is_never_accepted_again() -> None:
    secret = totp.new_secret()
    code = totp.code_at(secret, NOW)
    step = totp.accepted_step(secret, code, now=NOW, last_step=None)
    assert step is not None
    assert totp.accepted_step(secret, code, now=NOW, last_step=step) is None
    earlier = totp.code_at(secret, NOW - timedelta(seconds=30))
    assert totp.accepted_step(secret, earlier, now=NOW, last_step=step) is None
    later = totp.code_at(secret, NOW + timedelta(seconds=30))
    assert totp.accepted_step(secret, later, now=NOW, last_step=step) == step + 1


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12345a", " 123456", "' OR 1=1"])
def test_malformed_codes_are_refused(code: str) -> None:
    assert totp.accepted_step(totp.new_secret(), code, now=NOW, last_step=None) is None
