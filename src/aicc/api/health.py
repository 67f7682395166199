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
    """The model is loaded and the engine loop is alive (with engine workers: one is ready,
    or a remote replica serves their model meanwhile), and the server is not draining;
    otherwise 503."""
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.is_draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    workers = getattr(request.app.state, "workers", None)
    if workers is not None:  # engine workers: ready while one of them is, or a fallback
        num_ready = workers.num_ready
        router = getattr(request.app.state, "router", None)
        if num_ready == 0 and (router is None or not router.serves_without_workers()):
            detail = "no engine worker is ready (restarting)"
            return JSONResponse({"status": "not_ready", "detail": detail}, status_code=503)
        return JSONResponse({"status": "ready", "workers_ready": num_ready})
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    health = engine.health()
    if not health.is_ready:
        return JSONResponse({"status": "not_ready", "detail": health.detail}, status_code=503)
    return JSONResponse({"status": "ready", "model": engine.model_info.name})
