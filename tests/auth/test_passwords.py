from __future__ import annotations

import pytest

from aicc.auth.passwords import Passwords, check_password_policy
from aicc.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("password", "rule"),
    [
        ("Sh0rt!", "at least 12"),
        ("Aa1!" * 300, "at most 1024"),
        ("xxAlice-2026xx", "username"),
        ("alllowercase1234", "3 of"),
        ("ALLUPPER-AND-DASH", "3 of"),
    ],
)
def test_policy_refuses(password: str, rule: str) -> None:
    with pytest.raises(InvalidRequestError, match=rule) as caught:
        check_password_policy(password, username="alice", min_length=12)
    assert caught.value.param == "password"
    assert password not in caught.value.message


@pytest.mark.parametrize("password", ["Correct-Horse-9", "correct horse 9 battery", "ÄÖÜäöü123456"])
def test_policy_accepts(password: str) -> None:
    check_password_policy(password, username="alice", min_length=12)


def test_default_hasher_is_argon2id_and_verifies() -> None:
    passwords = Passwords()
    password_hash = passwords.hash("Correct-Horse-9")
    assert password_hash.startswith("$argon2id$")
    assert passwords.verify(password_hash, "Correct-Horse-9")
    assert not passwords.verify(password_hash, "Correct-Horse-8")
    assert not passwords.verify("not a hash", "Correct-Horse-9")
    assert not passwords.needs_rehash(password_hash)
    passwords.dummy_verify("anything")  # costs a verify, raises nothing
