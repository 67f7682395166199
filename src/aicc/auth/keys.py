"""API keys: a key never grants more than its owner holds, and is shown in plaintext once."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aicc.auth import tokens
from aicc.auth.base import ServiceBase, check_limits, set_limits
from aicc.auth.permissions import patterns_within
from aicc.auth.principal import Limits
from aicc.auth.roles import check_model_patterns, check_permissions
from aicc.auth.views import KeyView, key_view
from aicc.db.models import ApiKey, User
from aicc.errors import InvalidRequestError, NotFoundError, PermissionDeniedError

MAX_KEY_NAME_LENGTH = 128


def _check_key_name(name: str) -> str:
    if not 1 <= len(name) <= MAX_KEY_NAME_LENGTH or not name.isprintable():
        raise InvalidRequestError(
            f"key name must be 1-{MAX_KEY_NAME_LENGTH} printable characters", param="name"
        )
    return name


def owner_permissions(user: User) -> set[str]:
    return {permission for role in user.roles for permission in role.permissions}


def owner_models(user: User) -> list[str]:
    return list(dict.fromkeys(pattern for role in user.roles for pattern in role.models))


class KeyAdmin(ServiceBase):
    def create_key(
        self,
        username: str,
        *,
        name: str,
        scopes: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        expires_at: datetime | None = None,
        limits: Limits = Limits(),  # noqa: B008 -- frozen, so a shared default is safe
    ) -> tuple[KeyView, str]:
        """A new key of `username` and its plaintext (returned only here, never again).

        Raises NotFoundError (no such user), InvalidRequestError (bad name, scope, pattern,
        expiry or limits), PermissionDeniedError (scopes or models beyond the owner's).
        """
        _check_key_name(name)
        check_limits(limits)
        scope_list = None if scopes is None else check_permissions(scopes, param="scopes")
        model_list = None if models is None else check_model_patterns(models, param="models")
        if expires_at is not None and (expires_at.tzinfo is None or expires_at <= self._now()):
            raise InvalidRequestError(
                "expires_at must be a future time with a time zone", param="expires_at"
            )
        with self._db.session() as session:
            owner = self._get_user(session, username)
            if scope_list is not None and not set(scope_list) <= owner_permissions(owner):
                raise PermissionDeniedError(
                    "a key's scopes must be permissions its owner holds", param="scopes"
                )
            if model_list is not None and not patterns_within(model_list, owner_models(owner)):
                raise PermissionDeniedError(
                    "a key's models must be within its owner's models", param="models"
                )
            key, plaintext = self._add_key(session, owner, name=name, expires_at=expires_at)
            key.scopes, key.models = scope_list, model_list
            set_limits(key, limits)
            session.flush()
            return key_view(key), plaintext

    def list_keys(
        self, username: str | None = None, include_revoked: bool = False
    ) -> list[KeyView]:
        """Keys of `username` (None: everyone's), oldest first. Raises NotFoundError."""
        with self._db.session() as session:
            query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
            if username is not None:
                query = query.where(ApiKey.user_id == self._get_user(session, username).id)
            if not include_revoked:
                query = query.where(ApiKey.revoked_at.is_(None))
            return [key_view(key) for key in session.scalars(query)]

    def get_key(self, key_id: str) -> KeyView:
        """Raises NotFoundError."""
        with self._db.session() as session:
            return key_view(self._get_key(session, key_id))

    def revoke_key(self, key_id: str) -> KeyView:
        """Revoke at once (idempotent: a revoked key keeps its first revocation time).
        Raises NotFoundError."""
        with self._db.session() as session:
            key = self._get_key(session, key_id)
            if key.revoked_at is None:
                key.revoked_at = self._now()
            return key_view(key)

    def touch_key(self, key_id: str) -> None:
        """Record a use of the key now (callers rate-limit this; unknown ids are ignored)."""
        if not tokens.is_key_id(key_id):
            return
        with self._db.session() as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.key_id == key_id)
                .values(last_used_at=self._now())
                .execution_options(synchronize_session=False)
            )

    def _add_key(
        self,
        session: Session,
        owner: User,
        *,
        name: str,
        expires_at: datetime | None,
        plaintext: str | None = None,
    ) -> tuple[ApiKey, str]:
        plaintext = plaintext or tokens.new_api_key()
        key = ApiKey(
            key_id=tokens.new_key_id(),
            hint=tokens.token_hint(plaintext),
            key_hash=tokens.keyed_hash(self._secret, plaintext),
            name=name,
            user=owner,
            expires_at=expires_at,
            created_at=self._now(),
        )
        session.add(key)
        return key, plaintext

    def _get_key(self, session: Session, key_id: str) -> ApiKey:
        key = None
        if tokens.is_key_id(key_id):
            key = session.scalars(select(ApiKey).where(ApiKey.key_id == key_id)).one_or_none()
        if key is None:
            # The value is not echoed: it may be a misplaced password or key.
            raise NotFoundError("no such key", param="key_id")
        return key
