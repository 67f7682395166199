"""User accounts: create, list, change, disable, unlock; revoke their sessions."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aicc.auth.base import ServiceBase, check_limits, set_limits
from aicc.auth.passwords import check_password_policy
from aicc.auth.principal import Limits, is_valid_username
from aicc.auth.views import UserView, user_view
from aicc.db.models import AuthSession, User
from aicc.errors import ConflictError, InvalidRequestError

MAX_DISPLAY_NAME_LENGTH = 256


def _check_display_name(display_name: str | None) -> str | None:
    if display_name is not None and len(display_name) > MAX_DISPLAY_NAME_LENGTH:
        raise InvalidRequestError(
            f"display_name must be at most {MAX_DISPLAY_NAME_LENGTH} characters",
            param="display_name",
        )
    return display_name


def _check_role_names(roles: Iterable[str]) -> list[str]:
    if isinstance(roles, str):
        raise InvalidRequestError("roles must be a list of role names", param="roles")
    return list(roles)


class UserAdmin(ServiceBase):
    def create_user(
        self,
        username: str,
        *,
        password: str | None = None,
        roles: Iterable[str] = ("user",),
        display_name: str | None = None,
        limits: Limits = Limits(),  # noqa: B008 -- frozen, so a shared default is safe
    ) -> UserView:
        """A local user; without a password it can only use API keys.

        Raises InvalidRequestError (bad username, password policy, unknown role, bad limits),
        ConflictError (username taken).
        """
        if not is_valid_username(username):
            raise InvalidRequestError(
                "username must be 1-128 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit",
                param="username",
            )
        role_names = _check_role_names(roles)
        user = User(
            username=username,
            display_name=_check_display_name(display_name),
            source="local",
            created_at=self._now(),
        )
        set_limits(user, check_limits(limits))
        if password is not None:
            check_password_policy(
                password, username=username, min_length=self._settings.password_min_length
            )
            user.password_hash = self._passwords.hash(password)
        try:
            with self._db.session() as session:
                if self._find_user(session, username) is not None:
                    raise ConflictError(f"user {username!r} already exists", param="username")
                user.roles = self._roles_named(session, role_names, param="roles")
                session.add(user)
                session.flush()
                return user_view(user, now=self._now())
        except IntegrityError:  # created concurrently by another gateway
            raise ConflictError(f"user {username!r} already exists", param="username") from None

    def list_users(self) -> list[UserView]:
        now = self._now()
        with self._db.session() as session:
            users = session.scalars(select(User).order_by(User.username))
            return [user_view(user, now=now) for user in users]

    def get_user(self, username: str) -> UserView:
        """Raises NotFoundError."""
        with self._db.session() as session:
            return user_view(self._get_user(session, username), now=self._now())

    def update_user(
        self,
        username: str,
        *,
        display_name: str | None = None,
        roles: Iterable[str] | None = None,
        password: str | None = None,
        is_disabled: bool | None = None,
        limits: Limits | None = None,
        unlock: bool = False,
        reset_totp: bool = False,
    ) -> UserView:
        """Change what is given (None: unchanged). A new password ends the user's sessions;
        `reset_totp` turns their second factor off (a lost device). Raises NotFoundError,
        InvalidRequestError (password policy, unknown role, bad limits, a password for a
        directory user)."""
        if limits is not None:
            check_limits(limits)
        _check_display_name(display_name)
        password_hash = None
        if password is not None:
            check_password_policy(
                password, username=username, min_length=self._settings.password_min_length
            )
            password_hash = self._passwords.hash(password)
        with self._db.session() as session:
            user = self._get_user(session, username)
            if password_hash is not None:
                if user.source != "local":
                    raise InvalidRequestError(
                        "directory users have no local password; change it in the directory",
                        param="password",
                    )
                user.password_hash = password_hash
                self._end_sessions(session, user.id)
            if display_name is not None:
                user.display_name = display_name
            if roles is not None:
                user.roles = self._roles_named(session, _check_role_names(roles), param="roles")
            if is_disabled is not None:
                user.is_disabled = is_disabled
            if limits is not None:
                set_limits(user, limits)
            if unlock:
                user.num_failed_logins = 0
                user.locked_until = None
            if reset_totp:
                user.is_totp_enabled = False
                user.totp_secret = None
                user.totp_last_step = None
            user.updated_at = self._now()
            session.flush()
            return user_view(user, now=self._now())

    def revoke_sessions(self, username: str) -> int:
        """End every live session of `username`; the number ended. Raises NotFoundError."""
        with self._db.session() as session:
            user = self._get_user(session, username)
            return self._end_sessions(session, user.id)

    def _end_sessions(self, session: Session, user_id: int) -> int:
        now = self._now()
        result = session.execute(
            update(AuthSession)
            .where(AuthSession.user_id == user_id)
            .where(AuthSession.revoked_at.is_(None))
            .where(AuthSession.expires_at > now)
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0))
