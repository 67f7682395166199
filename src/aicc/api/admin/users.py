"""/admin/users: people and service accounts (the `security` role's duty)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from aicc.api.admin.deps import IdentityDep
from aicc.api.admin.protocol import Json, UserCreateBody, UserUpdateBody, user_json
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import PermissionDeniedError

router = APIRouter(prefix="/admin/users", tags=["admin"])
Reader = Annotated[Principal, require(Permission.USERS_READ)]
Writer = Annotated[Principal, require(Permission.USERS_WRITE)]


@router.get("")
async def list_users(_: Reader, identity: IdentityDep) -> Json:
    users = await identity.read(identity.service.list_users)
    return {"object": "list", "data": [user_json(user) for user in users]}


@router.post("", status_code=201)
async def create_user(body: UserCreateBody, principal: Writer, identity: IdentityDep) -> Json:
    await identity.check_grant(principal, roles=body.roles)
    user = await identity.change(
        identity.service.create_user,
        body.username,
        password=body.password,
        roles=tuple(body.roles),
        display_name=body.display_name,
        limits=body.limits(),
    )
    return user_json(user)


@router.get("/{username}")
async def get_user(username: str, _: Reader, identity: IdentityDep) -> Json:
    return user_json(await identity.read(identity.service.get_user, username))


@router.patch("/{username}")
async def update_user(
    username: str, body: UserUpdateBody, principal: Writer, identity: IdentityDep
) -> Json:
    if username == principal.username and (body.roles is not None or body.has_limits):
        # Separation of duties: nobody widens their own access.
        raise PermissionDeniedError("you cannot change your own roles or limits")
    await identity.check_grant(principal, roles=body.roles or ())
    limits = None
    if body.has_limits:  # only the limits named in the body change
        current = (await identity.read(identity.service.get_user, username)).limits
        limits = body.merged_limits(current)
    user = await identity.change(
        identity.service.update_user,
        username,
        display_name=body.display_name,
        roles=None if body.roles is None else tuple(body.roles),
        password=body.password,
        is_disabled=body.is_disabled,
        limits=limits,
        unlock=body.unlock,
        reset_totp=body.reset_totp,
    )
    return user_json(user)


@router.delete("/{username}/sessions")
async def revoke_sessions(username: str, _: Writer, identity: IdentityDep) -> Json:
    return {"revoked": await identity.change(identity.service.revoke_sessions, username)}
