"""Local passwords: argon2id hashes (argon2-cffi defaults) and the password policy."""

from __future__ import annotations

from functools import cached_property

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from aicc.errors import InvalidRequestError

MAX_PASSWORD_LENGTH = 1024
"""Bounds the work one login can cost (argon2 hashes the whole password)."""
MIN_CHARACTER_CLASSES = 3


class Passwords:
    """Hashes and verifies passwords; `dummy_verify` costs what a real verify costs, so a login
    for an unknown user takes as long as one with a wrong password."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        """False on a mismatch or an unreadable hash; never raises for a wrong password."""
        try:
            return self.hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def dummy_verify(self, password: str) -> None:
        self.verify(self._dummy_hash, password)

    @cached_property
    def _dummy_hash(self) -> str:
        return self.hasher.hash("aicc dummy password, never a real one")


def check_password_policy(password: str, *, username: str, min_length: int) -> None:
    """Raise InvalidRequestError(param="password") naming the rule `password` breaks (never
    echoing the password)."""
    if len(password) < min_length:
        raise InvalidRequestError(
            f"password must be at least {min_length} characters", param="password"
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidRequestError(
            f"password must be at most {MAX_PASSWORD_LENGTH} characters", param="password"
        )
    if username and username.casefold() in password.casefold():
        raise InvalidRequestError("password must not contain the username", param="password")
    classes = (
        any(char.islower() for char in password),
        any(char.isupper() for char in password),
        any(char.isdigit() for char in password),
        any(not char.isalnum() for char in password),
    )
    if sum(classes) < MIN_CHARACTER_CLASSES:
        raise InvalidRequestError(
            "password must mix at least 3 of: lower-case letters, upper-case letters, digits, "
            "other characters",
            param="password",
        )
