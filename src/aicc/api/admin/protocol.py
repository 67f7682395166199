"""Request bodies of the /auth and /admin routes, and the JSON shapes of identity views."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from aicc.auth.principal import Limits
from aicc.auth.views import KeyView, RoleView, UserView

Json = dict[str, Any]
_LIMIT_FIELDS = frozenset({"rpm", "tpm", "tpd", "max_streams"})
_Count = Field(default=None, ge=1, le=10**12)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsBody(_Body):
    rpm: int | None = _Count
    tpm: int | None = _Count
    tpd: int | None = _Count
    max_streams: int | None = _Count

    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.tpd, self.max_streams)

    @property
    def has_limits(self) -> bool:
        return bool(_LIMIT_FIELDS & self.model_fields_set)

    def merged_limits(self, current: Limits) -> Limits:
        """`current`, with the limits this body names (null clears one: unlimited)."""
        named = {name: getattr(self, name) for name in _LIMIT_FIELDS & self.model_fields_set}
        return replace(current, **named)


class LoginBody(_Body):
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)
    totp_code: str | None = Field(default=None, max_length=16)


class PasswordBody(_Body):
    old_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


class TotpCodeBody(_Body):
    code: str = Field(min_length=1, max_length=16)


class KeyBody(LimitsBody):
    name: str = Field(min_length=1, max_length=128)
    scopes: list[str] | None = Field(default=None, max_length=64)
    models: list[str] | None = Field(default=None, max_length=256)
    expires_at: AwareDatetime | None = None
    """ISO-8601 with a time zone."""


class AdminKeyBody(KeyBody):
    user: str = Field(min_length=1, max_length=128)


class UserCreateBody(LimitsBody):
    username: str = Field(min_length=1, max_length=128)
    password: str | None = Field(default=None, min_length=1, max_length=1024)
    roles: list[str] = Field(default_factory=lambda: ["user"], max_length=64)
    display_name: str | None = Field(default=None, max_length=256)


class UserUpdateBody(LimitsBody):
    display_name: str | None = Field(default=None, max_length=256)
    roles: list[str] | None = Field(default=None, max_length=64)
    password: str | None = Field(default=None, min_length=1, max_length=1024)
    is_disabled: bool | None = None
    unlock: bool = False
    reset_totp: bool = False
    """Turn the user's second factor off (a lost device); they enrol again."""


class RoleCreateBody(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=512)
    permissions: list[str] = Field(max_length=64)
    models: list[str] = Field(default_factory=list, max_length=256)


class RoleUpdateBody(_Body):
    description: str | None = Field(default=None, max_length=512)
    permissions: list[str] | None = Field(default=None, max_length=64)
    models: list[str] | None = Field(default=None, max_length=256)


def limits_json(limits: Limits) -> Json:
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "tpd": limits.tpd,
        "max_streams": limits.max_streams,
    }


def user_json(user: UserView) -> Json:
    return {
        "username": user.username,
        "display_name": user.display_name,
        "source": user.source,
        "roles": list(user.roles),
        "is_disabled": user.is_disabled,
        "is_locked": user.is_locked,
        "is_totp_enabled": user.is_totp_enabled,
        "limits": limits_json(user.limits),
        "created_at": _iso(user.created_at),
        "last_login_at": _iso(user.last_login_at),
    }


def key_json(key: KeyView) -> Json:
    return {
        "key_id": key.key_id,
        "name": key.name,
        "hint": key.hint,
        "user": key.username,
        "scopes": None if key.scopes is None else list(key.scopes),
        "models": None if key.models is None else list(key.models),
        "limits": limits_json(key.limits),
        "expires_at": _iso(key.expires_at),
        "created_at": _iso(key.created_at),
        "last_used_at": _iso(key.last_used_at),
        "revoked_at": _iso(key.revoked_at),
    }


def role_json(role: RoleView) -> Json:
    return {
        "name": role.name,
        "description": role.description,
        "permissions": list(role.permissions),
        "models": list(role.models),
        "is_builtin": role.is_builtin,
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()
