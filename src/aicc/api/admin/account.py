"""/auth: log in and out, who am I, one's own password, second factor and API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response

from aicc.api.admin.deps import Identity, IdentityDep
from aicc.api.admin.protocol import (
    Json,
    KeyBody,
    LoginBody,
    PasswordBody,
    TotpCodeBody,
    key_json,
    user_json,
)
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import InvalidRequestError, NotFoundError

router = APIRouter(prefix="/auth", tags=["account"])
Authenticated = Annotated[Principal, require(None)]
KeyOwner = Annotated[Principal, require(Permission.KEYS_SELF)]


@router.post("/login")
async def login(body: LoginBody, identity: IdentityDep, request: Request) -> Json:
    client = request.client.host if request.client else None
    session, token = await identity.read(
        identity.service.login,
        body.username,
        body.password,
        totp_code=body.totp_code,
        client=client,
    )
    user = await identity.read(identity.service.get_user, session.username)
    return {
        "token": token,
        "session_id": session.session_id,
        "expires_at": session.expires_at.isoformat(),
        "user": user_json(user),
    }


@router.post("/logout", status_code=204)
async def logout(principal: Authenticated, identity: IdentityDep) -> Response:
    if principal.via != "session":
        raise InvalidRequestError("logout ends a session; revoke an API key with DELETE /auth/keys")
    await identity.change(identity.service.logout, principal.credential_id)
    return Response(status_code=204)


@router.get("/me")
async def me(principal: Authenticated) -> Json:
    return {
        "username": principal.username,
        "roles": list(principal.roles),
        "permissions": sorted(principal.permissions),
        "models": list(principal.models),
        "via": principal.via,
        "credential_id": principal.credential_id,
        "is_mfa": principal.is_mfa,
    }


@router.post("/password", status_code=204)
async def change_password(
    body: PasswordBody, principal: Authenticated, identity: IdentityDep
) -> Response:
    await identity.change(
        identity.service.change_password, principal.username, body.old_password, body.new_password
    )
    return Response(status_code=204)


@router.post("/totp/enroll")
async def enroll_totp(principal: Authenticated, identity: IdentityDep) -> Json:
    secret, uri = await identity.change(identity.service.enroll_totp, principal.username)
    return {"secret": secret, "uri": uri}


@router.post("/totp/confirm", status_code=204)
async def confirm_totp(
    body: TotpCodeBody, principal: Authenticated, identity: IdentityDep
) -> Response:
    await identity.change(identity.service.confirm_totp, principal.username, body.code)
    return Response(status_code=204)


@router.post("/totp/disable", status_code=204)
async def disable_totp(
    body: TotpCodeBody, principal: Authenticated, identity: IdentityDep
) -> Response:
    await identity.change(identity.service.disable_totp, principal.username, body.code)
    return Response(status_code=204)


@router.get("/keys")
async def list_own_keys(
    principal: KeyOwner, identity: IdentityDep, include_revoked: bool = False
) -> Json:
    keys = await identity.read(
        identity.service.list_keys, principal.username, include_revoked=include_revoked
    )
    return {"object": "list", "data": [key_json(key) for key in keys]}


@router.post("/keys", status_code=201)
async def create_own_key(body: KeyBody, principal: KeyOwner, identity: IdentityDep) -> Json:
    return await create_key(identity, principal.username, body)


@router.delete("/keys/{key_id}")
async def revoke_own_key(key_id: str, principal: KeyOwner, identity: IdentityDep) -> Json:
    key = await identity.read(identity.service.get_key, key_id)
    if key.username != principal.username:
        raise NotFoundError(f"no API key {key_id!r} of yours")  # others' keys stay invisible
    return key_json(await identity.change(identity.service.revoke_key, key_id))


async def create_key(identity: Identity, username: str, body: KeyBody) -> Json:
    """Create a key for `username`; the only response that ever carries its plaintext."""
    view, plaintext = await identity.change(
        identity.service.create_key,
        username,
        name=body.name,
        scopes=body.scopes,
        models=body.models,
        expires_at=body.expires_at,
        limits=body.limits(),
    )
    return {"key": plaintext, **key_json(view)}
