"""What the identity service hands out: frozen views of its rows, without any secret."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from aicc.auth.principal import Limits
from aicc.db.models import ApiKey, AuthSession, Role, User


@dataclass(frozen=True, slots=True)
class UserView:
    username: str
    display_name: str | None
    source: str
    """``local`` or ``ldap``."""
    roles: tuple[str, ...]
    is_disabled: bool
    is_locked: bool
    """Locked out after failed logins, until the lockout ends or an admin unlocks."""
    is_totp_enabled: bool
    limits: Limits
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True, slots=True)
class RoleView:
    name: str
    description: str
    permissions: tuple[str, ...]
    """Sorted."""
    models: tuple[str, ...]
    is_builtin: bool


@dataclass(frozen=True, slots=True)
class KeyView:
    key_id: str
    name: str
    hint: str
    """The key's first characters, to recognise it in lists."""
    username: str
    scopes: tuple[str, ...] | None
    """None: all of the owner's permissions."""
    models: tuple[str, ...] | None
    """None: all of the owner's models."""
    limits: Limits
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    username: str
    is_mfa: bool
    created_at: datetime
    expires_at: datetime


def limits_of(row: User | ApiKey) -> Limits:
    return Limits(rpm=row.rpm, tpm=row.tpm, tpd=row.tpd, max_streams=row.max_streams)


def user_view(user: User, *, now: datetime) -> UserView:
    return UserView(
        username=user.username,
        display_name=user.display_name,
        source=user.source,
        roles=tuple(sorted(role.name for role in user.roles)),
        is_disabled=user.is_disabled,
        is_locked=user.locked_until is not None and user.locked_until > now,
        is_totp_enabled=user.is_totp_enabled,
        limits=limits_of(user),
        created_at=user.created_at,
        last_login_at=user.last_login_at,
    )


def role_view(role: Role) -> RoleView:
    return RoleView(
        name=role.name,
        description=role.description,
        permissions=tuple(sorted(role.permissions)),
        models=tuple(role.models),
        is_builtin=role.is_builtin,
    )


def key_view(key: ApiKey) -> KeyView:
    return KeyView(
        key_id=key.key_id,
        name=key.name,
        hint=key.hint,
        username=key.user.username,
        scopes=None if key.scopes is None else tuple(key.scopes),
        models=None if key.models is None else tuple(key.models),
        limits=limits_of(key),
        expires_at=key.expires_at,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
    )


def session_view(session: AuthSession) -> SessionView:
    return SessionView(
        session_id=session.session_id,
        username=session.user.username,
        is_mfa=session.is_mfa,
        created_at=session.created_at,
        expires_at=session.expires_at,
    )
