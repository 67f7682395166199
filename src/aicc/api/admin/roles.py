"""/admin/roles: built-in and custom roles (the `security` role's duty)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from aicc.api.admin.deps import IdentityDep
from aicc.api.admin.protocol import Json, RoleCreateBody, RoleUpdateBody, role_json
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal

router = APIRouter(prefix="/admin/roles", tags=["admin"])
Reader = Annotated[Principal, require(Permission.ROLES_READ)]
Writer = Annotated[Principal, require(Permission.ROLES_WRITE)]


@router.get("")
async def list_roles(_: Reader, identity: IdentityDep) -> Json:
    roles = await identity.read(identity.service.list_roles)
    return {"object": "list", "data": [role_json(role) for role in roles]}


@router.post("", status_code=201)
async def create_role(body: RoleCreateBody, principal: Writer, identity: IdentityDep) -> Json:
    await identity.check_grant(principal, permissions=body.permissions)
    role = await identity.change(
        identity.service.create_role,
        body.name,
        permissions=body.permissions,
        models=body.models,
        description=body.description,
    )
    return role_json(role)


@router.get("/{name}")
async def get_role(name: str, _: Reader, identity: IdentityDep) -> Json:
    return role_json(await identity.read(identity.service.get_role, name))


@router.patch("/{name}")
async def update_role(
    name: str, body: RoleUpdateBody, principal: Writer, identity: IdentityDep
) -> Json:
    await identity.check_grant(principal, permissions=body.permissions or ())
    role = await identity.change(
        identity.service.update_role,
        name,
        permissions=body.permissions,
        models=body.models,
        description=body.description,
    )
    return role_json(role)


@router.delete("/{name}", status_code=204)
async def delete_role(name: str, _: Writer, identity: IdentityDep) -> Response:
    await identity.change(identity.service.delete_role, name)
    return Response(status_code=204)
