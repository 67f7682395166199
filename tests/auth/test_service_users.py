from __future__ import annotations

import pytest

from aicc.auth.principal import Limits
from aicc.auth.service import IdentityService
from aicc.errors import ConflictError, InvalidRequestError, NotFoundError
from tests.auth.conftest import STRONG_PASSWORD, FakeClock


def test_user_crud(service: IdentityService, clock: FakeClock) -> None:
    created = service.create_user(
        "frank@example.org",
        password=STRONG_PASSWORD,
        roles=["user", "auditor"],
        display_name="Frank",
        limits=Limits(rpm=5),
    )
    assert created.roles == ("auditor", "user")
    assert created.source == "local"
    assert created.created_at == clock.now
    assert created.limits == Limits(rpm=5)
    assert not created.is_disabled
    assert not created.is_locked
    assert not created.is_totp_enabled
    assert service.get_user("frank@example.org") == created
    assert STRONG_PASSWORD not in repr(created)

    updated = service.update_user(
        "frank@example.org", display_name="F.", roles=["user"], limits=Limits(tpm=1000)
    )
    assert updated.display_name == "F."
    assert updated.roles == ("user",)
    assert updated.limits == Limits(tpm=1000)
    assert service.update_user("frank@example.org").limits == Limits(tpm=1000)

    service.create_user("alice")
    assert [user.username for user in service.list_users()] == ["alice", "frank@example.org"]
    with pytest.raises(ConflictError):
        service.create_user("alice")


def test_unknown_users(service: IdentityService) -> None:
    for call in (
        lambda: service.get_user("ghost"),
        lambda: service.update_user("ghost", is_disabled=True),
        lambda: service.revoke_sessions("ghost"),
        lambda: service.create_key("ghost", name="k"),
        lambda: service.enroll_totp("ghost"),
    ):
        with pytest.raises(NotFoundError):
            call()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"username": "-leading-dash"}, "username"),
        ({"username": "x" * 129}, "username"),
        ({"username": "spa ce"}, "username"),
        ({"username": "ok", "roles": ["root"]}, "roles"),
        ({"username": "ok", "roles": "user"}, "roles"),
        ({"username": "ok", "display_name": "d" * 257}, "display_name"),
        ({"username": "ok", "limits": Limits(max_streams=-1)}, "max_streams"),
    ],
)
def test_invalid_users_are_refused(service: IdentityService, kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        service.create_user(**kwargs)
    assert caught.value.param == param
    assert service.list_users() == []


def test_a_failed_update_changes_nothing(service: IdentityService) -> None:
    before = service.create_user("alice", display_name="A")
    with pytest.raises(InvalidRequestError):
        service.update_user("alice", display_name="B", roles=["user", "root"])
    assert service.get_user("alice") == before
