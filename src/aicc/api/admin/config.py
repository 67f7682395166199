"""/admin/config: the running settings, secrets masked (the `admin` role's duty)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from aicc.api.admin.protocol import Json
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.config import Settings

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/config")
async def get_config(
    _: Annotated[Principal, require(Permission.CONFIG_READ)], request: Request
) -> Json:
    settings: Settings = request.app.state.settings
    # SecretStr fields dump as "**********": no secret leaves the process.
    return settings.model_dump(mode="json")
