from __future__ import annotations

import pytest
from sqlalchemy import select, update

from aicc.auth.permissions import BUILTIN_ROLES, Permission
from aicc.auth.service import IdentityService
from aicc.db.models import Role
from aicc.errors import ConfigError


def test_bootstrap_creates_admin_once(service: IdentityService) -> None:
    key = service.bootstrap_admin(None)
    assert key is not None
    assert key.startswith("aicc-sk-")
    admin = service.get_user("admin")
    assert admin.roles == ("admin", "security")
    principal = service.resolve(key)
    assert principal is not None
    assert principal.username == "admin"
    assert principal.can(Permission.USERS_WRITE)
    assert principal.can(Permission.CONFIG_WRITE)
    assert [view.name for view in service.list_keys("admin")] == ["bootstrap"]

    assert service.bootstrap_admin(None) is None
    assert service.bootstrap_admin("z" * 40) is None
    assert [user.username for user in service.list_users()] == ["admin"]
    assert service.resolve("z" * 40) is None


@pytest.mark.parametrize("admin_key", ["aicc-sk-" + "A1b2_" * 9, "Q" * 32])
def test_bootstrap_uses_the_configured_key(service: IdentityService, admin_key: str) -> None:
    assert service.bootstrap_admin(admin_key) == admin_key
    principal = service.resolve(admin_key)
    assert principal is not None
    assert principal.username == "admin"


@pytest.mark.parametrize(
    "admin_key", ["short", "aicc-sk-x", "has space" * 5, "aicc-st-" + "a" * 43, "' OR 1=1 --" * 4]
)
def test_bootstrap_refuses_weak_or_malformed_keys(service: IdentityService, admin_key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        service.bootstrap_admin(admin_key)
    assert admin_key not in caught.value.message
    assert service.list_users() == []


def test_builtin_roles_are_created_and_refreshed(service: IdentityService) -> None:
    roles = {role.name: role for role in service.list_roles()}
    assert set(roles) == {role.name for role in BUILTIN_ROLES}
    assert all(role.is_builtin for role in roles.values())
    assert roles["user"].permissions == ("inference", "keys:self")

    with service._db.session() as session:  # an old version's definition, or tampering
        session.execute(update(Role).where(Role.name == "user").values(permissions=["audit:read"]))
    service.ensure_builtin_roles()
    service.ensure_builtin_roles()
    assert service.get_role("user").permissions == ("inference", "keys:self")
    with service._db.session() as session:
        assert len(session.scalars(select(Role)).all()) == len(BUILTIN_ROLES)
