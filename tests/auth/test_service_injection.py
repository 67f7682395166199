"""Hostile strings as usernames, keys, passwords and names: refused or harmless, tables intact."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from aicc.auth.service import IdentityService
from aicc.db.models import ApiKey, AuthSession, Role, User
from aicc.errors import AuthenticationError, InvalidRequestError, NotFoundError
from tests.auth.conftest import STRONG_PASSWORD

HOSTILE = [
    "' OR 1=1 --",
    "admin'--",
    "*)(uid=*",
    "admin' OR '1'='1",
    "'; DROP TABLE users; --",
    "admin\x00",
    "%",
    "_",
]


def table_sizes(service: IdentityService) -> dict[str, int]:
    with service._db.session() as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model)) or 0
            for model in (User, Role, ApiKey, AuthSession)
        }


@pytest.fixture
def seeded(service: IdentityService) -> dict[str, int]:
    service.bootstrap_admin(None)
    service.create_user("alice", password=STRONG_PASSWORD)
    service.login("alice", STRONG_PASSWORD)
    return table_sizes(service)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_usernames(service: IdentityService, seeded: dict[str, int], value: str) -> None:
    with pytest.raises(InvalidRequestError):
        service.create_user(value, password=STRONG_PASSWORD)
    with pytest.raises(NotFoundError):
        service.get_user(value)
    with pytest.raises(AuthenticationError) as caught:
        service.login(value, STRONG_PASSWORD)
    assert caught.value.code == "invalid_credentials"
    with pytest.raises(AuthenticationError):
        service.login(value, value)
    assert table_sizes(service) == seeded
    assert service.get_user("admin").roles == ("admin", "security")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_passwords_and_tokens(
    service: IdentityService, seeded: dict[str, int], value: str
) -> None:
    with pytest.raises(AuthenticationError):
        service.login("alice", value)
    with pytest.raises(AuthenticationError):
        service.login("admin", value)
    assert service.resolve(value) is None
    assert service.resolve("aicc-sk-" + value) is None
    assert service.resolve(value * 8) is None
    service.touch_key(value)
    with pytest.raises(NotFoundError):
        service.revoke_key(value)
    with pytest.raises(NotFoundError):
        service.logout(value)
    assert table_sizes(service) == seeded


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_are_data(
    service: IdentityService, seeded: dict[str, int], value: str
) -> None:
    if value.isprintable():
        view, key = service.create_key("alice", name=value)
        assert service.get_key(view.key_id).name == value
        assert service.resolve(key) is not None
    with pytest.raises(InvalidRequestError):
        service.create_role(value, permissions=[], models=[])
    with pytest.raises(NotFoundError):
        service.get_role(value)
    with pytest.raises(InvalidRequestError):
        service.create_role("r", permissions=[value], models=[])
    if value == "_":  # a legal model name: stored as data, matched literally
        assert service.create_role("r", permissions=[], models=[value]).models == ("_",)
    else:
        with pytest.raises(InvalidRequestError):
            service.create_role("r", permissions=[], models=[value])
    assert table_sizes(service)["users"] == seeded["users"]
