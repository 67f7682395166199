"""Password login (local argon2id or the directory), lockout, second factor, sessions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from aicc.auth import tokens
from aicc.auth.base import (
    DirectoryUser,
    ServiceBase,
    auth_error,
    invalid_credentials,
    logger,
)
from aicc.auth.passwords import MAX_PASSWORD_LENGTH, check_password_policy
from aicc.auth.permissions import PRIVILEGED_ROLES
from aicc.auth.principal import is_valid_username
from aicc.auth.views import SessionView, session_view
from aicc.db.models import AuthSession, Role, User
from aicc.errors import AuthenticationError, InvalidRequestError, NotFoundError

MAX_CLIENT_LENGTH = 256
MAX_DISPLAY_NAME_LENGTH = 256


@dataclass(frozen=True, slots=True)
class _Account:
    """What a login decides on, read in one short transaction (argon2 runs outside it)."""

    user_id: int
    username: str
    source: str
    password_hash: str | None
    is_disabled: bool
    locked_until: datetime | None
    is_totp_enabled: bool
    roles: frozenset[str]


def _account(user: User) -> _Account:
    return _Account(
        user_id=user.id,
        username=user.username,
        source=user.source,
        password_hash=user.password_hash,
        is_disabled=user.is_disabled,
        locked_until=user.locked_until,
        is_totp_enabled=user.is_totp_enabled,
        roles=frozenset(role.name for role in user.roles),
    )


class Logins(ServiceBase):
    def login(
        self,
        username: str,
        password: str,
        *,
        totp_code: str | None = None,
        client: str | None = None,
    ) -> tuple[SessionView, str]:
        """Open a session; returns it and its token (the only time the token is shown).

        Raises AuthenticationError with code "invalid_credentials" (unknown user, wrong
        password or code, disabled), "account_locked", "mfa_required" (send `totp_code`) or
        "mfa_enrolment_required"; LdapUnavailableError when the directory is unreachable.
        """
        account = self._authenticate(username, password)
        if account.is_disabled:
            raise invalid_credentials()
        is_mfa = self._check_second_factor(account, totp_code)
        return self._open_session(account, password, is_mfa=is_mfa, client=client)

    def logout(self, session_id: str) -> None:
        """End the session (idempotent). Raises NotFoundError."""
        with self._db.session() as session:
            row = None
            if tokens.is_session_id(session_id):
                query = select(AuthSession).where(AuthSession.session_id == session_id)
                row = session.scalars(query).one_or_none()
            if row is None:
                # The value is not echoed: it may be a misplaced password or key.
                raise NotFoundError("no such session", param="session_id")
            if row.revoked_at is None:
                row.revoked_at = self._now()

    def change_password(self, username: str, old_password: str, new_password: str) -> None:
        """Raises NotFoundError, InvalidRequestError (directory user, wrong old password — which
        counts toward lockout — or a new password the policy refuses), AuthenticationError
        "account_locked"."""
        with self._db.session() as session:
            source = self._get_user(session, username).source
        if source != "local":
            raise InvalidRequestError(
                "directory users change their password in the directory", param="new_password"
            )
        try:
            self._authenticate(username, old_password)
        except AuthenticationError as exc:
            if exc.code == "invalid_credentials":
                raise InvalidRequestError("old password is wrong", param="old_password") from None
            raise
        if new_password == old_password:
            raise InvalidRequestError("new password must differ from the old", param="password")
        check_password_policy(
            new_password, username=username, min_length=self._settings.password_min_length
        )
        password_hash = self._passwords.hash(new_password)
        with self._db.session() as session:
            user = self._get_user(session, username)
            user.password_hash = password_hash
            user.updated_at = self._now()

    def _authenticate(self, username: str, password: str) -> _Account:
        if not password or len(password) > MAX_PASSWORD_LENGTH or not is_valid_username(username):
            self._passwords.dummy_verify(password[:MAX_PASSWORD_LENGTH])
            raise invalid_credentials()
        with self._db.session() as session:
            user = self._find_user(session, username)
            account = None if user is None else _account(user)
        if account is not None:
            self._check_not_locked(account)
        if account is None or account.source == "ldap":
            return self._authenticate_directory(username, password, account)
        if account.password_hash is None:
            self._passwords.dummy_verify(password)  # key-only account: same cost, same answer
            is_valid = False
        else:
            is_valid = self._passwords.verify(account.password_hash, password)
        if not is_valid:
            self._record_failure(account)
            raise invalid_credentials()
        return account

    def _authenticate_directory(
        self, username: str, password: str, account: _Account | None
    ) -> _Account:
        if self._ldap is None:
            self._passwords.dummy_verify(password)
            raise invalid_credentials()
        directory_user = self._ldap.authenticate(username, password)
        if directory_user is None:
            if account is not None:
                self._record_failure(account)
            raise invalid_credentials()
        account = self._sync_directory_user(directory_user)
        self._check_not_locked(account)
        return account

    def _sync_directory_user(self, directory_user: DirectoryUser) -> _Account:
        """Create or refresh the row of a user the directory vouched for; roles follow the
        directory's groups at every login."""
        username = directory_user.username
        if not is_valid_username(username):
            raise invalid_credentials()
        with self._db.session() as session:
            user = self._find_user(session, username)
            if user is None:
                user = User(username=username, source="ldap", created_at=self._now())
                session.add(user)
            elif user.source != "ldap":
                # A local account of the same name is not taken over by the directory.
                logger.warning(
                    "directory login for %s refused: a local user has that name", username
                )
                raise invalid_credentials()
            known = list(session.scalars(select(Role).where(Role.name.in_(directory_user.roles))))
            unknown = set(directory_user.roles) - {role.name for role in known}
            if unknown:
                logger.warning("directory roles %s of %s do not exist", sorted(unknown), username)
            if not known:
                raise invalid_credentials()
            user.roles = known
            display_name = directory_user.display_name
            user.display_name = display_name[:MAX_DISPLAY_NAME_LENGTH] if display_name else None
            session.flush()
            return _account(user)

    def _check_not_locked(self, account: _Account) -> None:
        if account.locked_until is not None and account.locked_until > self._now():
            raise auth_error(
                "account_locked", "too many failed logins: the account is locked for a while"
            )

    def _record_failure(self, account: _Account) -> None:
        with self._db.session() as session:
            # An SQL increment, not read-modify-write: concurrent failures all count.
            session.execute(
                update(User)
                .where(User.id == account.user_id)
                .values(num_failed_logins=User.num_failed_logins + 1)
                .execution_options(synchronize_session=False)
            )
            query = select(User.num_failed_logins).where(User.id == account.user_id)
            num_failed = session.scalar(query) or 0
            if num_failed >= self._settings.lockout_threshold:
                locked_until = self._now() + timedelta(seconds=self._settings.lockout_s)
                session.execute(
                    update(User)
                    .where(User.id == account.user_id)
                    .values(num_failed_logins=0, locked_until=locked_until)
                    .execution_options(synchronize_session=False)
                )
                logger.warning(
                    "user %s locked out for %d s after %d failed logins",
                    account.username,
                    self._settings.lockout_s,
                    num_failed,
                )

    def _check_second_factor(self, account: _Account, totp_code: str | None) -> bool:
        """Whether a second factor was presented; raises when one is needed and missing."""
        if not account.is_totp_enabled:
            if self._settings.mfa_required and account.roles & PRIVILEGED_ROLES:
                raise auth_error(
                    "mfa_enrolment_required",
                    "this account must enrol a TOTP second factor before logging in",
                )
            return False
        if totp_code is None:
            raise auth_error("mfa_required", "a TOTP code is required for this account")
        with self._db.session() as session:
            user = session.get(User, account.user_id)
            step = None if user is None else self._accepted_totp_step(user, totp_code)
            is_valid = step is not None and self._claim_totp_step(session, account.user_id, step)
        if not is_valid:
            self._record_failure(account)
            raise invalid_credentials()
        return True

    def _open_session(
        self, account: _Account, password: str, *, is_mfa: bool, client: str | None
    ) -> tuple[SessionView, str]:
        token = tokens.new_session_token()
        now = self._now()
        with self._db.session() as session:
            user = session.get(User, account.user_id)
            if user is None:  # deleted while logging in
                raise invalid_credentials()
            user.num_failed_logins = 0
            user.locked_until = None
            user.last_login_at = now
            if user.password_hash is not None and self._passwords.needs_rehash(user.password_hash):
                user.password_hash = self._passwords.hash(password)
            row = AuthSession(
                session_id=tokens.new_session_id(),
                token_hash=tokens.keyed_hash(self._secret, token),
                user=user,
                is_mfa=is_mfa,
                client=client[:MAX_CLIENT_LENGTH] if client else None,
                created_at=now,
                expires_at=now + timedelta(seconds=self._settings.session_ttl_s),
            )
            session.add(row)
            session.flush()
            return session_view(row), token
