"""TOTP enrolment: enrol (pending), confirm with a first code, disable with a current code."""

from __future__ import annotations

from aicc.auth import totp
from aicc.auth.base import ServiceBase
from aicc.errors import ConflictError, InvalidRequestError


class TotpAdmin(ServiceBase):
    def enroll_totp(self, username: str) -> tuple[str, str]:
        """A new seed for `username`: (base32 secret, otpauth:// URI). It takes effect only once
        `confirm_totp` sees a code from it; enrolling again replaces a pending seed.

        Raises NotFoundError, ConflictError (TOTP already on: disable it first).
        """
        with self._db.session() as session:
            user = self._get_user(session, username)
            if user.is_totp_enabled:
                raise ConflictError("TOTP is already enabled; disable it first", param="username")
            seed = totp.new_secret()
            user.totp_secret = self._seal_totp_seed(user.id, seed)
            user.totp_last_step = None
            return seed, totp.provisioning_uri(seed, user.username)

    def confirm_totp(self, username: str, code: str) -> None:
        """Turn TOTP on. Raises NotFoundError, ConflictError (nothing pending),
        InvalidRequestError(param="code") (wrong or reused code)."""
        with self._db.session() as session:
            user = self._get_user(session, username)
            if user.is_totp_enabled or user.totp_secret is None:
                raise ConflictError("no TOTP enrolment is pending; enrol first", param="code")
            step = self._accepted_totp_step(user, code)
            if step is None or not self._claim_totp_step(session, user.id, step):
                raise InvalidRequestError("wrong or already used TOTP code", param="code")
            user.is_totp_enabled = True

    def disable_totp(self, username: str, code: str) -> None:
        """Turn TOTP off (a current code proves the caller holds the device).
        Raises NotFoundError, ConflictError (TOTP is off), InvalidRequestError(param="code")."""
        with self._db.session() as session:
            user = self._get_user(session, username)
            if not user.is_totp_enabled:
                raise ConflictError("TOTP is not enabled", param="code")
            step = self._accepted_totp_step(user, code)
            if step is None or not self._claim_totp_step(session, user.id, step):
                raise InvalidRequestError("wrong or already used TOTP code", param="code")
            user.is_totp_enabled = False
            user.totp_secret = None
            user.totp_last_step = None
