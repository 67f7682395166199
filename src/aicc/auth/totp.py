"""TOTP second factor (RFC 6238: 30 s steps, 6 digits, SHA-1), with replay protection.

A code is accepted for the current step or one step either side (clock drift), and only for a
step later than the last one accepted for that user, so an observed code cannot be reused.
"""

from __future__ import annotations

import hmac
import re
from datetime import datetime

import pyotp

ISSUER = "aicc"
STEP_S = 30
DIGITS = 6
VALID_WINDOW = 1

_CODE = re.compile(r"^[0-9]{6}$")


def new_secret() -> str:
    """A fresh base32 seed (160 bits)."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, username: str) -> str:
    """The ``otpauth://`` URI an authenticator app scans (as a QR code)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).provisioning_uri(
        name=username, issuer_name=ISSUER
    )


def time_step(now: datetime) -> int:
    return int(now.timestamp()) // STEP_S


def accepted_step(secret: str, code: str, *, now: datetime, last_step: int | None) -> int | None:
    """The time step `code` is valid for, or None: wrong, malformed, outside the window, or for
    a step at or before `last_step` (already used)."""
    if not _CODE.fullmatch(code):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S)
    current = time_step(now)
    accepted = None
    # Check every step in the window (no early exit) so timing does not reveal which matched.
    for step in range(current - VALID_WINDOW, current + VALID_WINDOW + 1):
        is_match = hmac.compare_digest(totp.generate_otp(step).encode(), code.encode())
        if is_match and (last_step is None or step > last_step):
            accepted = step
    return accepted


def code_at(secret: str, now: datetime) -> str:
    """The code for `now` (tests and `aicc` tooling; an authenticator app does this)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_S).generate_otp(time_step(now))
