from __future__ import annotations

from datetime import timedelta

import pytest

from aicc.auth.permissions import Permission
from aicc.auth.principal import Limits
from aicc.auth.service import IdentityService
from aicc.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from tests.auth.conftest import FakeClock


@pytest.fixture
def alice(service: IdentityService) -> str:
    service.create_role("qwen", permissions=["inference", "keys:self"], models=["qwen-*"])
    service.create_user("alice", roles=["qwen"], limits=Limits(rpm=60, tpd=100_000))
    return "alice"


def test_create_resolve_and_revoke(service: IdentityService, alice: str) -> None:
    view, key = service.create_key(alice, name="laptop", limits=Limits(rpm=10, max_streams=2))
    assert key.startswith("aicc-sk-")
    assert view.hint == key[:12] + "…"
    assert key not in repr(view)
    assert view.username == alice
    assert view.scopes is None
    assert view.models is None
    assert service.get_key(view.key_id) == view

    principal = service.resolve(key)
    assert principal is not None
    assert principal.via == "key"
    assert principal.key_id == view.key_id
    assert principal.username == alice
    assert principal.roles == ("qwen",)
    assert principal.permissions == {Permission.INFERENCE, Permission.KEYS_SELF}
    assert principal.models == ("qwen-*",)
    assert principal.can_use_model("qwen-7b")
    assert not principal.can_use_model("gemma-3")
    assert principal.user_limits == Limits(rpm=60, tpd=100_000)
    assert principal.key_limits == Limits(rpm=10, max_streams=2)

    revoked = service.revoke_key(view.key_id)
    assert revoked.revoked_at is not None
    assert service.resolve(key) is None
    assert service.revoke_key(view.key_id).revoked_at == revoked.revoked_at
    assert service.list_keys(alice) == []
    assert [k.key_id for k in service.list_keys(alice, include_revoked=True)] == [view.key_id]


def test_expired_keys_do_not_resolve(
    service: IdentityService, alice: str, clock: FakeClock
) -> None:
    _, key = service.create_key(alice, name="temp", expires_at=clock.now + timedelta(hours=1))
    assert service.resolve(key) is not None
    clock.advance(3600)
    assert service.resolve(key) is None
    with pytest.raises(InvalidRequestError) as caught:
        service.create_key(alice, name="past", expires_at=clock.now - timedelta(seconds=1))
    assert caught.value.param == "expires_at"
    with pytest.raises(InvalidRequestError):
        service.create_key(alice, name="naive", expires_at=clock.now.replace(tzinfo=None))


def test_scopes_and_models_narrow_the_owner(service: IdentityService, alice: str) -> None:
    _, key = service.create_key(alice, name="ci", scopes=["inference"], models=["qwen-7b*"])
    principal = service.resolve(key)
    assert principal is not None
    assert principal.permissions == {Permission.INFERENCE}
    assert principal.models == ("qwen-7b*",)
    assert principal.can_use_model("qwen-7b-instruct")
    assert not principal.can_use_model("qwen-14b")


def test_a_key_cannot_exceed_its_owner(service: IdentityService, alice: str) -> None:
    with pytest.raises(PermissionDeniedError) as caught:
        service.create_key(alice, name="x", scopes=["inference", "users:write"])
    assert caught.value.param == "scopes"
    with pytest.raises(PermissionDeniedError) as caught:
        service.create_key(alice, name="x", models=["gemma-*"])
    assert caught.value.param == "models"
    with pytest.raises(PermissionDeniedError):
        service.create_key(alice, name="x", models=["*"])
    assert service.list_keys(alice) == []


def test_keys_shrink_with_their_owners_roles(service: IdentityService, alice: str) -> None:
    _, key = service.create_key(alice, name="k", models=["qwen-7b", "qwen-14b"])
    service.update_role("qwen", models=["qwen-7b"])
    principal = service.resolve(key)
    assert principal is not None
    assert principal.models == ("qwen-7b",)
    service.update_role("qwen", permissions=["keys:self"])
    principal = service.resolve(key)
    assert principal is not None
    assert not principal.can(Permission.INFERENCE)


def test_disabled_users_keys_do_not_resolve(service: IdentityService, alice: str) -> None:
    _, key = service.create_key(alice, name="k")
    service.update_user(alice, is_disabled=True)
    assert service.resolve(key) is None
    service.update_user(alice, is_disabled=False)
    assert service.resolve(key) is not None


def test_touch_key_and_listing(service: IdentityService, alice: str, clock: FakeClock) -> None:
    view, _ = service.create_key(alice, name="one")
    service.create_user("bob")
    service.create_key("bob", name="two")
    clock.advance(5)
    service.touch_key(view.key_id)
    service.touch_key("key_000000000000")  # unknown: ignored
    assert service.get_key(view.key_id).last_used_at == clock.now
    assert [k.name for k in service.list_keys()] == ["one", "two"]
    with pytest.raises(NotFoundError):
        service.list_keys("nobody")


@pytest.mark.parametrize("key_id", ["key_000000000000", "nope", "key_' OR 1=1 --", ""])
def test_unknown_key_ids(service: IdentityService, key_id: str) -> None:
    with pytest.raises(NotFoundError):
        service.get_key(key_id)
    with pytest.raises(NotFoundError):
        service.revoke_key(key_id)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": ""}, "name"),
        ({"name": "n" * 129}, "name"),
        ({"name": "line\nbreak"}, "name"),
        ({"name": "k", "scopes": ["sudo"]}, "scopes"),
        ({"name": "k", "models": ["qwen-[0-9]"]}, "models"),
        ({"name": "k", "limits": Limits(rpm=0)}, "rpm"),
        ({"name": "k", "limits": Limits(tpd=2**40)}, "tpd"),
    ],
)
def test_invalid_keys_are_refused(
    service: IdentityService, alice: str, kwargs: dict, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        service.create_key(alice, **kwargs)
    assert caught.value.param == param


def test_errors_never_echo_a_secret(service: IdentityService, alice: str) -> None:
    _, key = service.create_key(alice, name="k")
    for call in (service.get_key, service.revoke_key, service.get_user, service.logout):
        with pytest.raises(NotFoundError) as caught:
            call(key)
        assert key[8:20] not in caught.value.message


def test_resolve_refuses_junk(service: IdentityService, alice: str) -> None:
    _, key = service.create_key(alice, name="k")
    for token in ["", key[:-1], key + "x", key.upper(), "aicc-sk-" + "A" * 43, "x" * 10_000]:
        assert service.resolve(token) is None
