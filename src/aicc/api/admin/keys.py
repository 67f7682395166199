"""/admin/keys: everyone's API keys (the `security` role's duty)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from aicc.api.admin.account import create_key
from aicc.api.admin.deps import IdentityDep
from aicc.api.admin.protocol import AdminKeyBody, Json, key_json
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal

router = APIRouter(prefix="/admin/keys", tags=["admin"])
Reader = Annotated[Principal, require(Permission.KEYS_READ)]
Writer = Annotated[Principal, require(Permission.KEYS_WRITE)]


@router.get("")
async def list_keys(
    _: Reader, identity: IdentityDep, user: str | None = None, include_revoked: bool = False
) -> Json:
    keys = await identity.read(identity.service.list_keys, user, include_revoked=include_revoked)
    return {"object": "list", "data": [key_json(key) for key in keys]}


@router.post("", status_code=201)
async def create_user_key(body: AdminKeyBody, _: Writer, identity: IdentityDep) -> Json:
    return await create_key(identity, body.user, body)


@router.get("/{key_id}")
async def get_key(key_id: str, _: Reader, identity: IdentityDep) -> Json:
    return key_json(await identity.read(identity.service.get_key, key_id))


@router.delete("/{key_id}")
async def revoke_key(key_id: str, _: Writer, identity: IdentityDep) -> Json:
    return key_json(await identity.change(identity.service.revoke_key, key_id))
