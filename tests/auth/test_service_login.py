from __future__ import annotations

from collections.abc import Callable

import pytest

from aicc.auth.permissions import Permission
from aicc.auth.service import IdentityService
from aicc.errors import AuthenticationError, InvalidRequestError, NotFoundError
from tests.auth.conftest import STRONG_PASSWORD, FakeClock


def login_error(service: IdentityService, username: str, password: str) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as caught:
        service.login(username, password)
    return caught.value


@pytest.fixture
def bob(service: IdentityService) -> str:
    service.create_user("bob", password=STRONG_PASSWORD, display_name="Bob")
    return "bob"


def test_login_opens_a_session(service: IdentityService, bob: str, clock: FakeClock) -> None:
    session, token = service.login(bob, STRONG_PASSWORD, client="aicc-cli/1.0")
    assert token.startswith("aicc-st-")
    assert session.session_id.startswith("ses_")
    assert session.username == bob
    assert not session.is_mfa
    assert (session.expires_at - session.created_at).total_seconds() == 12 * 3600
    assert service.get_user(bob).last_login_at == clock.now

    principal = service.resolve(token)
    assert principal is not None
    assert principal.via == "session"
    assert principal.credential_id == session.session_id
    assert principal.key_limits is None
    assert principal.can(Permission.INFERENCE)

    service.logout(session.session_id)
    assert service.resolve(token) is None
    service.logout(session.session_id)  # idempotent
    with pytest.raises(NotFoundError):
        service.logout("ses_000000000000")


def test_sessions_expire(service: IdentityService, bob: str, clock: FakeClock) -> None:
    _, token = service.login(bob, STRONG_PASSWORD)
    clock.advance(12 * 3600 - 1)
    assert service.resolve(token) is not None
    clock.advance(1)
    assert service.resolve(token) is None


def test_wrong_and_unknown_look_the_same(service: IdentityService, bob: str) -> None:
    wrong = login_error(service, bob, "Wrong-Password-1")
    unknown = login_error(service, "nobody", STRONG_PASSWORD)
    malformed = login_error(service, "bad name!", STRONG_PASSWORD)
    empty = login_error(service, bob, "")
    assert {e.code for e in (wrong, unknown, malformed, empty)} == {"invalid_credentials"}
    assert len({e.message for e in (wrong, unknown, malformed, empty)}) == 1
    assert STRONG_PASSWORD not in wrong.message


def test_key_only_users_cannot_log_in(service: IdentityService) -> None:
    service.create_user("robot")
    assert login_error(service, "robot", STRONG_PASSWORD).code == "invalid_credentials"


def test_lockout_and_unlock(service: IdentityService, bob: str, clock: FakeClock) -> None:
    for _ in range(3):  # lockout_threshold=3 in these tests
        assert login_error(service, bob, "Wrong-Password-1").code == "invalid_credentials"
    assert service.get_user(bob).is_locked
    # Locked: even the right password is refused, without being checked.
    assert login_error(service, bob, STRONG_PASSWORD).code == "account_locked"
    clock.advance(60)
    assert not service.get_user(bob).is_locked
    service.login(bob, STRONG_PASSWORD)

    for _ in range(3):
        login_error(service, bob, "Wrong-Password-1")
    assert service.update_user(bob, unlock=True).is_locked is False
    service.login(bob, STRONG_PASSWORD)


def test_a_success_resets_the_failure_count(service: IdentityService, bob: str) -> None:
    for _ in range(2):
        login_error(service, bob, "Wrong-Password-1")
    service.login(bob, STRONG_PASSWORD)
    for _ in range(2):
        login_error(service, bob, "Wrong-Password-1")
    assert not service.get_user(bob).is_locked


def test_disabled_users_cannot_log_in(service: IdentityService, bob: str) -> None:
    _, token = service.login(bob, STRONG_PASSWORD)
    service.update_user(bob, is_disabled=True)
    assert service.resolve(token) is None
    assert login_error(service, bob, STRONG_PASSWORD).code == "invalid_credentials"


def test_revoke_sessions(service: IdentityService, bob: str) -> None:
    tokens = [service.login(bob, STRONG_PASSWORD)[1] for _ in range(2)]
    assert service.revoke_sessions(bob) == 2
    assert all(service.resolve(token) is None for token in tokens)
    assert service.revoke_sessions(bob) == 0


def test_change_password(service: IdentityService, bob: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        service.change_password(bob, "Wrong-Password-1", "New-Password-77")
    assert caught.value.param == "old_password"
    with pytest.raises(InvalidRequestError) as caught:
        service.change_password(bob, STRONG_PASSWORD, "weak")
    assert caught.value.param == "password"
    service.change_password(bob, STRONG_PASSWORD, "New-Password-77")
    assert login_error(service, bob, STRONG_PASSWORD).code == "invalid_credentials"
    service.login(bob, "New-Password-77")


def test_admin_sets_a_password(service: IdentityService, bob: str) -> None:
    with pytest.raises(InvalidRequestError):
        service.update_user(bob, password="bob-Password-1")  # contains the username
    service.update_user(bob, password="Other-Password-2")
    service.login(bob, "Other-Password-2")


@pytest.mark.parametrize("password", ["short1A!", "nouppercase-or-digit", "Bob-is-12345"])
def test_create_user_enforces_the_policy(service: IdentityService, password: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        service.create_user("bob", password=password)
    assert caught.value.param == "password"
    with pytest.raises(NotFoundError):
        service.get_user("bob")


def test_policy_minimum_follows_settings(make_service: Callable[..., IdentityService]) -> None:
    service = make_service(password_min_length=20)
    with pytest.raises(InvalidRequestError, match="at least 20"):
        service.create_user("dave", password=STRONG_PASSWORD)
