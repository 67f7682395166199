"""`GET /metrics` on the main port: Prometheus text format.

`router` needs the `metrics:read` permission; `public_router` serves the same without a
credential, for `metrics_public: true`. The app includes one of them (neither when metrics are
off). The separate metrics port is `aicc.observability.metrics_server`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import Response

from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import NotFoundError
from aicc.observability.metrics import Metrics

router = APIRouter()
public_router = APIRouter()


@router.get("/metrics")
async def metrics(
    _: Annotated[Principal, require(Permission.METRICS_READ)], request: Request
) -> Response:
    return _render(request)


@public_router.get("/metrics")
async def public_metrics(request: Request) -> Response:
    return _render(request)


def _render(request: Request) -> Response:
    """Raises `NotFoundError` when metrics are off."""
    registry: Metrics | None = getattr(request.app.state, "metrics", None)
    if registry is None:
        raise NotFoundError("metrics are disabled on this server (metrics_enabled: false)")
    body, content_type = registry.render()
    return Response(body, headers={"Content-Type": content_type})
