"""IdentityService: users, roles, API keys, logins and sessions, and who a token belongs to.

The class is assembled from one part per concern (`roles`, `users`, `keys`, `mfa`,
`sessions`); this module adds start-up (`bootstrap_admin`) and `resolve`, the hot path every
authenticated request takes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from aicc.auth import tokens
from aicc.auth.base import DirectoryAuthenticator, DirectoryUser
from aicc.auth.keys import KeyAdmin, owner_models
from aicc.auth.mfa import TotpAdmin
from aicc.auth.permissions import Permission, patterns_within
from aicc.auth.principal import Principal
from aicc.auth.roles import RoleAdmin
from aicc.auth.sessions import Logins
from aicc.auth.users import UserAdmin
from aicc.auth.views import limits_of
from aicc.db.models import ApiKey, AuthSession, User
from aicc.errors import ConfigError

__all__ = ["DirectoryAuthenticator", "DirectoryUser", "IdentityService"]

BOOTSTRAP_USERNAME = "admin"
BOOTSTRAP_ROLES = ("admin", "security")
BOOTSTRAP_KEY_NAME = "bootstrap"

_PERMISSIONS = {permission.value: permission for permission in Permission}


class IdentityService(RoleAdmin, UserAdmin, KeyAdmin, TotpAdmin, Logins):
    """Synchronous and DB-backed; constructed with (db, settings, secret, ldap) plus an
    optional `clock` and `passwords` hasher."""

    def bootstrap_admin(self, admin_key: str | None) -> str | None:
        """On an empty database: create the built-in roles, user "admin" (admin + security) and
        its key "bootstrap" (`admin_key`, or a new one). Returns that key's plaintext, or None
        when users already exist.

        Raises ConfigError when `admin_key` is shorter than 32 characters or holds characters
        other than A-Z a-z 0-9 _ -.
        """
        if admin_key is not None and not (
            len(admin_key) >= tokens.MIN_BARE_KEY_LENGTH and tokens.is_api_key(admin_key)
        ):
            raise ConfigError(
                "admin_key must be at least 32 characters of A-Z a-z 0-9 _ - "
                "(e.g. made by `aicc keys new`), and must not start with aicc-st-"
            )
        self.ensure_builtin_roles()
        try:
            with self._db.session() as session:
                if session.scalars(select(User.id).limit(1)).first() is not None:
                    return None
                admin = User(
                    username=BOOTSTRAP_USERNAME,
                    display_name="Administrator",
                    source="local",
                    created_at=self._now(),
                )
                admin.roles = self._roles_named(session, BOOTSTRAP_ROLES, param="roles")
                session.add(admin)
                _, plaintext = self._add_key(
                    session, admin, name=BOOTSTRAP_KEY_NAME, expires_at=None, plaintext=admin_key
                )
        except IntegrityError:  # another gateway on the same database bootstrapped first
            return None
        return plaintext

    def resolve(self, token: str) -> Principal | None:
        """Who `token` (an API key or a session token) belongs to, with permissions and models
        narrowed to the key's; None when it is unknown, expired, revoked, or its user is
        disabled. Never raises for a bad token."""
        now = self._now()
        if tokens.is_session_token(token):
            return self._resolve_session(token, now)
        if tokens.is_api_key(token):
            return self._resolve_key(token, now)
        return None

    def _resolve_key(self, token: str, now: datetime) -> Principal | None:
        digest = tokens.keyed_hash(self._secret, token)
        with self._db.session() as session:
            key = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
            if key is None or not tokens.hashes_equal(key.key_hash, digest):
                return None
            if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
                return None
            user = key.user
            if user.is_disabled:
                return None
            permissions = _role_permissions(user)
            models = owner_models(user)
            if key.scopes is not None:
                scopes = set(key.scopes)
                permissions = frozenset(p for p in permissions if p.value in scopes)
            if key.models is not None:
                # Re-checked at every use: the owner's roles may have shrunk since creation.
                models = [pattern for pattern in key.models if patterns_within([pattern], models)]
            return Principal(
                user_id=user.id,
                username=user.username,
                roles=tuple(sorted(role.name for role in user.roles)),
                permissions=permissions,
                models=tuple(models),
                via="key",
                credential_id=key.key_id,
                user_limits=limits_of(user),
                key_limits=limits_of(key),
            )

    def _resolve_session(self, token: str, now: datetime) -> Principal | None:
        digest = tokens.keyed_hash(self._secret, token)
        with self._db.session() as session:
            query = select(AuthSession).where(AuthSession.token_hash == digest)
            row = session.scalars(query).one_or_none()
            if row is None or not tokens.hashes_equal(row.token_hash, digest):
                return None
            if row.revoked_at is not None or row.expires_at <= now or row.user.is_disabled:
                return None
            user = row.user
            return Principal(
                user_id=user.id,
                username=user.username,
                roles=tuple(sorted(role.name for role in user.roles)),
                permissions=_role_permissions(user),
                models=tuple(owner_models(user)),
                via="session",
                credential_id=row.session_id,
                user_limits=limits_of(user),
                is_mfa=row.is_mfa,
            )


def _role_permissions(user: User) -> frozenset[Permission]:
    # Unknown strings (a permission dropped in a later version) grant nothing.
    return frozenset(
        _PERMISSIONS[value]
        for role in user.roles
        for value in role.permissions
        if value in _PERMISSIONS
    )
