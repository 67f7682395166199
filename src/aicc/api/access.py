"""The inference routes' one dependency: who calls, may they use this model, is their quota left.

The lease it yields counts a generation in flight (concurrent-stream limits) until the response
has been sent, and receives the engine's real token counts (`serving` records them).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import EngineUnavailableError, PermissionDeniedError
from aicc.quota import RateLimiter, UsageLease


@dataclass(frozen=True, slots=True)
class InferenceCaller:
    principal: Principal
    usage: UsageLease

    @property
    def cache_scope(self) -> str:
        """Prefix-cache partition: a user's requests share cached prompts, users never do."""
        return self.principal.tenant


def check_model_access(principal: Principal, model: str) -> None:
    """Raise PermissionDeniedError unless the caller's roles and key allow `model`."""
    if not principal.can_use_model(model):
        raise PermissionDeniedError(
            f"Your credential may not use the model {model!r}.", param="model"
        )


async def inference_caller(
    request: Request, principal: Annotated[Principal, require(Permission.INFERENCE)]
) -> AsyncIterator[InferenceCaller]:
    model = await _requested_model(request)
    if model is not None:
        check_model_access(principal, model)
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is None:
        raise EngineUnavailableError("the server is starting; retry shortly")
    lease = limiter.acquire(principal)
    try:
        yield InferenceCaller(principal, lease)
    finally:
        lease.release()


Caller = Annotated[InferenceCaller, Depends(inference_caller)]


async def _requested_model(request: Request) -> str | None:
    """The `model` a request names: its path parameter, or its JSON body's field. A body that
    does not parse is left to the route's validation (400)."""
    model = request.path_params.get("model_id")
    if isinstance(model, str):
        return model
    if request.method != "POST":
        return None
    try:
        body: Any = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = body.get("model") if isinstance(body, dict) else None
    return value if isinstance(value, str) else None
