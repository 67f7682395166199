from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select

from aicc.auth import totp
from aicc.auth.service import IdentityService
from aicc.db.models import User
from aicc.errors import AuthenticationError, ConflictError, InvalidRequestError
from tests.auth.conftest import STRONG_PASSWORD, FakeClock


def wrong_code(secret: str, clock: FakeClock) -> str:
    valid = {totp.code_at(secret, clock.now + timedelta(seconds=s)) for s in (-30, 0, 30)}
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in valid)


def enrol(service: IdentityService, username: str, clock: FakeClock) -> str:
    secret, uri = service.enroll_totp(username)
    assert uri.startswith("otpauth://totp/")
    assert secret in uri
    service.confirm_totp(username, totp.code_at(secret, clock.now))
    clock.advance(30)  # the confirming code's step is used up
    return secret


def login_code(service: IdentityService, username: str, code: str | None) -> str:
    with pytest.raises(AuthenticationError) as caught:
        service.login(username, STRONG_PASSWORD, totp_code=code)
    return str(caught.value.code)


def test_enrol_confirm_and_log_in_with_a_code(service: IdentityService, clock: FakeClock) -> None:
    service.create_user("erin", password=STRONG_PASSWORD)
    secret = enrol(service, "erin", clock)
    assert service.get_user("erin").is_totp_enabled

    assert login_code(service, "erin", None) == "mfa_required"
    assert login_code(service, "erin", wrong_code(secret, clock)) == "invalid_credentials"
    code = totp.code_at(secret, clock.now)
    session, token = service.login("erin", STRONG_PASSWORD, totp_code=code)
    assert session.is_mfa
    principal = service.resolve(token)
    assert principal is not None
    assert principal.is_mfa
    # The same code again (replay), even within its window, is refused.
    assert login_code(service, "erin", code) == "invalid_credentials"


def test_wrong_codes_count_toward_lockout(service: IdentityService, clock: FakeClock) -> None:
    service.create_user("erin", password=STRONG_PASSWORD)
    secret = enrol(service, "erin", clock)
    for _ in range(3):
        assert login_code(service, "erin", wrong_code(secret, clock)) == "invalid_credentials"
    assert login_code(service, "erin", wrong_code(secret, clock)) == "account_locked"


def test_pending_enrolment_changes_nothing(service: IdentityService, clock: FakeClock) -> None:
    service.create_user("erin", password=STRONG_PASSWORD)
    secret, _ = service.enroll_totp("erin")
    assert not service.get_user("erin").is_totp_enabled
    service.login("erin", STRONG_PASSWORD)  # no code needed yet
    with pytest.raises(InvalidRequestError) as caught:
        service.confirm_totp("erin", wrong_code(secret, clock))
    assert caught.value.param == "code"
    old = totp.code_at(secret, clock.now - timedelta(seconds=120))
    with pytest.raises(InvalidRequestError):
        service.confirm_totp("erin", old)
    new_secret, _ = service.enroll_totp("erin")  # replaces the pending seed
    with pytest.raises(InvalidRequestError):
        service.confirm_totp("erin", totp.code_at(secret, clock.now))
    service.confirm_totp("erin", totp.code_at(new_secret, clock.now))
    with pytest.raises(ConflictError):
        service.enroll_totp("erin")
    with pytest.raises(ConflictError):
        service.confirm_totp("erin", totp.code_at(new_secret, clock.now))


def test_disable_needs_a_fresh_code(service: IdentityService, clock: FakeClock) -> None:
    service.create_user("erin", password=STRONG_PASSWORD)
    secret = enrol(service, "erin", clock)
    with pytest.raises(InvalidRequestError):
        service.disable_totp("erin", totp.code_at(secret, clock.now - timedelta(seconds=30)))
    service.disable_totp("erin", totp.code_at(secret, clock.now))
    assert not service.get_user("erin").is_totp_enabled
    service.login("erin", STRONG_PASSWORD)
    with pytest.raises(ConflictError):
        service.disable_totp("erin", totp.code_at(secret, clock.now))


def test_mfa_required_for_privileged_roles(
    make_service: Callable[..., IdentityService], clock: FakeClock
) -> None:
    service = make_service(mfa_required=True)
    service.create_user("sec", password=STRONG_PASSWORD, roles=["security"])
    service.create_user("plain", password=STRONG_PASSWORD)
    assert not service.login("plain", STRONG_PASSWORD)[0].is_mfa
    assert login_code(service, "sec", None) == "mfa_enrolment_required"
    secret = enrol(service, "sec", clock)
    assert login_code(service, "sec", None) == "mfa_required"
    session, _ = service.login("sec", STRONG_PASSWORD, totp_code=totp.code_at(secret, clock.now))
    assert session.is_mfa


def test_seeds_are_stored_encrypted(service: IdentityService) -> None:
    service.create_user("erin", password=STRONG_PASSWORD)
    secret, _ = service.enroll_totp("erin")
    with service._db.session() as session:
        stored = session.scalars(select(User.totp_secret).where(User.username == "erin")).one()
    assert stored is not None
    assert secret not in stored
