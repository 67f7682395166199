from __future__ import annotations

import pytest

from aicc.auth.principal import Limits
from aicc.auth.service import IdentityService
from aicc.errors import ConflictError, InvalidRequestError, NotFoundError


def test_role_crud(service: IdentityService) -> None:
    role = service.create_role(
        "analyst",
        permissions=["keys:self", "inference", "inference"],
        models=["qwen-*", "gemma-3-270m"],
        description="Analysts",
    )
    assert role.permissions == ("inference", "keys:self")
    assert role.models == ("qwen-*", "gemma-3-270m")
    assert not role.is_builtin
    assert service.get_role("analyst") == role

    updated = service.update_role("analyst", models=["qwen-7b"], description="Fewer models")
    assert updated.models == ("qwen-7b",)
    assert updated.permissions == role.permissions
    assert updated.description == "Fewer models"

    with pytest.raises(ConflictError):
        service.create_role("analyst", permissions=[], models=[])
    service.delete_role("analyst")
    with pytest.raises(NotFoundError):
        service.get_role("analyst")
    with pytest.raises(NotFoundError):
        service.delete_role("analyst")


@pytest.mark.parametrize("name", ["admin", "security", "auditor", "user"])
def test_builtin_roles_are_immutable(service: IdentityService, name: str) -> None:
    before = service.get_role(name)
    with pytest.raises(ConflictError):
        service.update_role(name, permissions=["config:write"])
    with pytest.raises(ConflictError):
        service.delete_role(name)
    assert service.get_role(name) == before


def test_a_role_in_use_cannot_be_deleted(service: IdentityService) -> None:
    service.create_role("ops", permissions=["models:read"], models=[])
    service.create_user("carol", roles=["ops"], limits=Limits())
    with pytest.raises(ConflictError, match="held by 1"):
        service.delete_role("ops")
    service.update_user("carol", roles=["user"])
    service.delete_role("ops")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"name": "Bad Name", "permissions": [], "models": []}, "name"),
        ({"name": "x" * 65, "permissions": [], "models": []}, "name"),
        ({"name": "ok", "permissions": ["root"], "models": []}, "permissions"),
        ({"name": "ok", "permissions": "inference", "models": []}, "permissions"),
        ({"name": "ok", "permissions": [], "models": ["[a-z]*"]}, "models"),
        ({"name": "ok", "permissions": [], "models": ["a b"]}, "models"),
        ({"name": "ok", "permissions": [], "models": [], "description": "d" * 513}, "description"),
    ],
)
def test_invalid_roles_are_refused(service: IdentityService, kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        service.create_role(**kwargs)
    assert caught.value.param == param
    assert len(service.list_roles()) == 4
