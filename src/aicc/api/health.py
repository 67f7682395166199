"""Liveness and readiness probes (public: load balancers and Kubernetes call them)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The model is loaded and the engine loop is alive; otherwise 503."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    health = engine.health()
    if not health.is_ready:
        return JSONResponse({"status": "not_ready", "detail": health.detail}, status_code=503)
    return JSONResponse({"status": "ready", "model": engine.model_info.name})
