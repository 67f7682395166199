"""Login through the directory (a fake `LdapAuthenticator` returning real `DirectoryUser`s)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from aicc.auth.ldap import DirectoryUser
from aicc.auth.service import IdentityService
from aicc.errors import AuthenticationError
from tests.auth.conftest import STRONG_PASSWORD, FakeDirectory

DIRECTORY_PASSWORD = "directory-secret"


def directory_user(username: str, roles: tuple[str, ...], name: str = "Dana") -> DirectoryUser:
    return DirectoryUser(
        username=username,
        dn=f"uid={username},ou=people,dc=example,dc=org",
        display_name=name,
        groups=("cn=staff,ou=groups,dc=example,dc=org",),
        roles=roles,
    )


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory({"dana": (DIRECTORY_PASSWORD, directory_user("dana", ("user",)))})


@pytest.fixture
def service(
    make_service: Callable[..., IdentityService], directory: FakeDirectory
) -> IdentityService:
    return make_service(ldap=directory)


def test_first_login_creates_the_user(service: IdentityService) -> None:
    session, token = service.login("Dana", DIRECTORY_PASSWORD)
    assert session.username == "dana"  # as the directory spells it
    user = service.get_user("dana")
    assert user.source == "ldap"
    assert user.roles == ("user",)
    assert user.display_name == "Dana"
    assert service.resolve(token) is not None


def test_roles_follow_the_directory_at_each_login(
    service: IdentityService, directory: FakeDirectory
) -> None:
    service.login("dana", DIRECTORY_PASSWORD)
    directory.accounts["dana"] = (
        DIRECTORY_PASSWORD,
        directory_user("dana", ("auditor", "no-such-role"), name="Dana D."),
    )
    service.login("dana", DIRECTORY_PASSWORD)
    user = service.get_user("dana")
    assert user.roles == ("auditor",)
    assert user.display_name == "Dana D."


def test_directory_failures(service: IdentityService, directory: FakeDirectory) -> None:
    service.login("dana", DIRECTORY_PASSWORD)
    for _ in range(3):
        with pytest.raises(AuthenticationError) as caught:
            service.login("dana", "wrong")
        assert caught.value.code == "invalid_credentials"
    with pytest.raises(AuthenticationError) as caught:
        service.login("dana", DIRECTORY_PASSWORD)
    assert caught.value.code == "account_locked"

    with pytest.raises(AuthenticationError) as caught:
        service.login("nobody", "whatever")
    assert caught.value.code == "invalid_credentials"


def test_only_known_roles_let_a_directory_user_in(
    service: IdentityService, directory: FakeDirectory
) -> None:
    directory.accounts["eve"] = (DIRECTORY_PASSWORD, directory_user("eve", ("unmapped",)))
    with pytest.raises(AuthenticationError):
        service.login("eve", DIRECTORY_PASSWORD)


def test_local_users_never_reach_the_directory(
    service: IdentityService, directory: FakeDirectory
) -> None:
    service.create_user("dana", password=STRONG_PASSWORD)
    with pytest.raises(AuthenticationError):
        service.login("dana", DIRECTORY_PASSWORD)  # the local password decides
    service.login("dana", STRONG_PASSWORD)
    assert directory.calls == []
    assert service.get_user("dana").source == "local"


def test_invalid_usernames_never_reach_the_directory(
    service: IdentityService, directory: FakeDirectory
) -> None:
    for username in ["*)(uid=*", "admin)(|(uid=*", "' OR 1=1 --", ""]:
        with pytest.raises(AuthenticationError):
            service.login(username, DIRECTORY_PASSWORD)
    assert directory.calls == []


def test_without_a_directory_unknown_users_fail(
    make_service: Callable[..., IdentityService],
) -> None:
    service = make_service()
    with pytest.raises(AuthenticationError) as caught:
        service.login("dana", DIRECTORY_PASSWORD)
    assert caught.value.code == "invalid_credentials"
