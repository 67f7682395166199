"""What every part of the identity service shares: its dependencies, the username rule, and
lookups that turn a bad name into the right error."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from aicc.auth import tokens, totp
from aicc.auth.passwords import Passwords
from aicc.auth.permissions import is_valid_role_name
from aicc.auth.principal import Limits, is_valid_username
from aicc.config import Settings
from aicc.db import Database
from aicc.db.models import ApiKey, Role, User, utcnow
from aicc.errors import AuthenticationError, InvalidRequestError, NotFoundError

logger = logging.getLogger("aicc.auth")

MAX_LIMIT = 2**31 - 1
"""Limits are 32-bit integer columns on PostgreSQL."""


class DirectoryUser(Protocol):
    """A user the directory vouched for (`aicc.auth.ldap.DirectoryUser` has these fields)."""

    @property
    def username(self) -> str: ...
    @property
    def dn(self) -> str: ...
    @property
    def display_name(self) -> str | None: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def roles(self) -> tuple[str, ...]: ...


class DirectoryAuthenticator(Protocol):
    """Checks a password against a directory (`aicc.auth.ldap.LdapAuthenticator`)."""

    def authenticate(self, username: str, password: str) -> DirectoryUser | None: ...


def auth_error(code: str, message: str) -> AuthenticationError:
    error = AuthenticationError(message)
    error.code = code
    return error


def invalid_credentials() -> AuthenticationError:
    # One message for unknown user, wrong password, wrong code, disabled account: the answer
    # must not tell an attacker which part was right.
    return auth_error("invalid_credentials", "invalid username, password or code")


def check_limits(limits: Limits) -> Limits:
    """Raise InvalidRequestError naming the first limit that is not a positive 32-bit int."""
    for name in ("rpm", "tpm", "tpd", "max_streams"):
        value = getattr(limits, name)
        if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_LIMIT):
            raise InvalidRequestError(
                f"{name} must be an integer from 1 to {MAX_LIMIT}, or unset", param=name
            )
    return limits


def set_limits(row: User | ApiKey, limits: Limits) -> None:
    row.rpm, row.tpm, row.tpd = limits.rpm, limits.tpm, limits.tpd
    row.max_streams = limits.max_streams


class ServiceBase:
    """Dependencies of the identity service. Every method is synchronous and runs its own short
    transaction (async callers use `asyncio.to_thread`)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        secret: bytes,
        ldap: DirectoryAuthenticator | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        passwords: Passwords | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._secret = secret
        self._ldap = ldap
        self._clock = clock
        self._passwords = passwords or Passwords()

    def _now(self) -> datetime:
        return self._clock()

    def _find_user(self, session: Session, username: str) -> User | None:
        if not is_valid_username(username):
            return None
        return session.scalars(select(User).where(User.username == username)).one_or_none()

    def _get_user(self, session: Session, username: str) -> User:
        """Raises NotFoundError (also for a name that cannot be a username)."""
        user = self._find_user(session, username)
        if user is None:
            # The value is not echoed: it may be a misplaced password or key.
            raise NotFoundError("no such user", param="username")
        return user

    def _roles_named(self, session: Session, names: Iterable[str], *, param: str) -> list[Role]:
        """Raises InvalidRequestError naming the first role that does not exist."""
        wanted = sorted(set(names))
        found = {
            role.name: role for role in session.scalars(select(Role).where(Role.name.in_(wanted)))
        }
        for name in wanted:
            if name not in found:
                shown = repr(name) if is_valid_role_name(name) else "with that name"
                raise InvalidRequestError(f"no role {shown}", param=param)
        return [found[name] for name in wanted]

    def _accepted_totp_step(self, user: User, code: str) -> int | None:
        """The time step `code` is valid for under `user`'s seed (None: wrong or reused)."""
        if user.totp_secret is None:
            return None
        try:
            seed = tokens.open_sealed(
                self._secret, user.totp_secret, context=_totp_context(user.id)
            ).decode()
        except tokens.SealError:
            logger.error(
                "TOTP seed of user %s does not decrypt (server secret changed?)", user.username
            )
            return None
        return totp.accepted_step(seed, code, now=self._now(), last_step=user.totp_last_step)

    def _claim_totp_step(self, session: Session, user_id: int, step: int) -> bool:
        """Record `step` as used, atomically: of two logins racing with one code, one wins."""
        result = session.execute(
            update(User)
            .where(User.id == user_id)
            .where(or_(User.totp_last_step.is_(None), User.totp_last_step < step))
            .values(totp_last_step=step)
            .execution_options(synchronize_session="fetch")
        )
        return bool(getattr(result, "rowcount", 0) == 1)

    def _seal_totp_seed(self, user_id: int, seed: str) -> str:
        return tokens.seal(self._secret, seed.encode(), context=_totp_context(user_id))


def _totp_context(user_id: int) -> bytes:
    return f"user:{user_id}".encode()
