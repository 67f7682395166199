"""/admin/deployments: variants, weights and replica health; promote, roll back, re-weight.

Reading needs `config:read`; changes need `deployments:write`. Each change is persisted (a
restart keeps it) and lands in the call's audit entry with the weights it set.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from aicc.api.admin.protocol import Json
from aicc.api.record import call_record
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import ModelNotFoundError
from aicc.router.policy import DeploymentSpec
from aicc.router.service import Router

router = APIRouter(prefix="/admin", tags=["admin"])

Reader = Annotated[Principal, require(Permission.CONFIG_READ)]
Deployer = Annotated[Principal, require(Permission.DEPLOY)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteBody(_Body):
    variant: str = Field(min_length=1, max_length=64)


class RollbackBody(_Body):
    variant: str | None = Field(default=None, min_length=1, max_length=64)
    """Default: the auto-rollback baseline, else the first variant."""


class WeightsBody(_Body):
    weights: dict[str, float] = Field(min_length=1, max_length=32)


def _router(request: Request) -> Router:
    deployments: Router | None = getattr(request.app.state, "router", None)
    if deployments is None:
        raise ModelNotFoundError("this server has no deployments (settings: deployments)")
    return deployments


def _changed(request: Request, spec: DeploymentSpec) -> Json:
    """The new weights, as the answer and in the call's audit detail."""
    weights = {variant.name: variant.weight for variant in spec.variants}
    record = call_record(request)
    if record is not None:
        record.detail = {**(record.detail or {}), "model": spec.model, "weights": weights}
    return {"model": spec.model, "weights": weights}


@router.get("/deployments")
async def list_deployments(_: Reader, request: Request) -> Json:
    return {"object": "list", "data": _router(request).describe()}


@router.post("/deployments/{model:path}/promote")
async def promote(model: str, body: PromoteBody, who: Deployer, request: Request) -> Json:
    spec = await _router(request).promote(model, body.variant, actor=who.username)
    return _changed(request, spec)


@router.post("/deployments/{model:path}/rollback")
async def rollback(model: str, body: RollbackBody, who: Deployer, request: Request) -> Json:
    spec = await _router(request).rollback(model, body.variant, actor=who.username)
    return _changed(request, spec)


@router.post("/deployments/{model:path}/weights")
async def set_weights(model: str, body: WeightsBody, who: Deployer, request: Request) -> Json:
    spec = await _router(request).set_weights(model, body.weights, actor=who.username)
    return _changed(request, spec)
