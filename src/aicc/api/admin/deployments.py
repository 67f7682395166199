"""/admin/deployments: variants, weights and replica health; promote, roll back, re-weight;
create, replace and remove deployments at run time.

Reading needs `config:read`; changes need `deployments:write`. Each change is persisted (a
restart keeps it) and lands in the call's audit entry (keys masked) with what it set.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aicc.api.admin.protocol import Json
from aicc.api.record import call_record
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import InvalidRequestError, ModelNotFoundError
from aicc.router.policy import DeploymentSpec
from aicc.router.service import Router
from aicc.router.settings import DeploymentSettings

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


def _note(request: Request, detail: Json) -> None:
    record = call_record(request)
    if record is not None:
        record.detail = {**(record.detail or {}), **detail}


def deployment_settings(model: str, body: dict[str, Any]) -> DeploymentSettings:
    """The body of a PUT as settings, `model` from the path; a replica may carry a literal
    `api_key`. Raises `RequestValidationError` (400; messages never echo the input)."""
    if body.get("model", model) != model:
        raise InvalidRequestError(
            "model: the body names another model than the path", param="model"
        )
    try:
        return DeploymentSettings.from_api({**body, "model": model})
    except ValidationError as exc:
        errors = [
            {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        raise RequestValidationError(errors) from None


def _changed(request: Request, spec: DeploymentSpec) -> Json:
    """The new weights, as the answer and in the call's audit detail."""
    weights = {variant.name: variant.weight for variant in spec.variants}
    _note(request, {"model": spec.model, "weights": weights})
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


@router.put("/deployments/{model:path}")
async def put_deployment(
    model: str, body: Annotated[dict[str, Any], Body()], who: Deployer, request: Request,
    response: Response,
) -> Json:  # fmt: skip
    """Create (201) or replace (200) a deployment made through the API."""
    settings = deployment_settings(model, body)
    view, is_created = await _router(request).put(settings, actor=who.username)
    _note(request, {"model": model, "created": is_created})
    response.status_code = 201 if is_created else 200
    return view


@router.delete("/deployments/{model:path}")
async def delete_deployment(model: str, who: Deployer, request: Request) -> Json:
    await _router(request).remove(model, actor=who.username)
    _note(request, {"model": model})
    return {"model": model, "deleted": True}
