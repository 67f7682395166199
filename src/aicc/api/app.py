"""`create_app(settings)`: the whole HTTP application; state is built in `lifespan`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from aicc import __version__
from aicc.api import feedback, health, tokenize
from aicc.api import metrics as metrics_routes
from aicc.api.admin import account, audit, deployments, keys, roles, users
from aicc.api.admin import config as config_routes
from aicc.api.deadline import DeadlineMiddleware
from aicc.api.drain import DrainMiddleware, DrainState
from aicc.api.errors import error_response, install_error_handlers
from aicc.api.fastproxy import ProxyShortcut
from aicc.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from aicc.api.models import ModelsBusyError
from aicc.api.observe import RecordingMiddleware
from aicc.api.openai import embeddings
from aicc.api.openai import routes as openai_routes
from aicc.api.record import call_record
from aicc.api.state import (
    APP_STATE_NAMES,
    open_state,
    running_model,
    running_state,
    running_worker_models,
)
from aicc.config import Settings
from aicc.observability.logging import log_call
from aicc.observability.metrics import Metrics
from aicc.router.lifespan import running_router
from aicc.store.local import LocalModel

__all__ = ["bare_app", "create_app", "open_state"]


def bare_app(
    settings: Settings, title: str, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
) -> FastAPI:
    """The FastAPI app with the state every route and middleware reads (unset until the
    lifespan fills it) and the OpenAI-style error handlers; no routes yet."""
    # No /docs or /openapi.json: every route is authenticated or listed public, and these
    # would be neither. `aicc` serves OpenAI's documented API.
    app = FastAPI(
        title=title,
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # FastAPI's own OpenTelemetry bridge looks for configured providers on every
        # request; aicc's telemetry is its Prometheus metrics, JSON logs and audit log.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    for name in APP_STATE_NAMES:
        setattr(app.state, name, None)
    app.state.metrics = Metrics() if settings.metrics_enabled else None
    app.state.log_call = log_call
    install_error_handlers(app)
    return app


def create_app(
    settings: Settings,
    model: LocalModel | None = None,
    on_bootstrap_key: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. `model` is the resolved model file (resolved from settings if None);
    `on_bootstrap_key` receives the new admin key when start-up creates the first user (it is
    shown once, never logged)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(running_state(app, settings, on_bootstrap_key))
            metrics = app.state.metrics
            if metrics is not None:
                stack.callback(metrics.close)  # releases NVML
            if metrics is not None and settings.metrics_port is not None:
                from aicc.observability.metrics_server import serving_metrics

                await stack.enter_async_context(serving_metrics(metrics, settings))
            if settings.workers:  # the model runs in engine worker processes instead
                await stack.enter_async_context(running_worker_models(app, settings))
            else:
                await stack.enter_async_context(running_model(app, settings, model))
            await stack.enter_async_context(running_router(app, settings))
            # Start-up made millions of long-lived objects (the vocabulary's pieces, routes,
            # settings): keep them out of every future full collection, whose pauses would
            # otherwise stall all requests (tens of ms each, often).
            gc.freeze()
            yield

    app = bare_app(settings, "aicc", lifespan)
    app.add_exception_handler(ModelsBusyError, _on_models_busy)  # type: ignore[arg-type]
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(embeddings.router)
    app.include_router(tokenize.router)
    app.include_router(feedback.router)
    for module in (account, users, keys, roles, config_routes, audit, deployments):
        app.include_router(module.router)
    if settings.metrics_enabled:
        public = settings.metrics_public
        app.include_router(metrics_routes.public_router if public else metrics_routes.router)
    add_request_middlewares(app, settings)
    return app


def add_request_middlewares(app: FastAPI, settings: Settings) -> None:
    """What every aicc server runs around its routes (the gateway and the engine worker),
    outermost first: request id, call recording, drain, deadline, body size and time limits,
    and the short way for calls to remote-only deployments.
    Sets `app.state.drain` for the `DrainingServer` and readiness."""
    app.state.drain = DrainState(retry_after_s=settings.retry_after_s)
    app.add_middleware(ProxyShortcut)  # innermost: the body has passed its limits
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(DeadlineMiddleware, request_timeout_s=settings.request_timeout_s)
    app.add_middleware(DrainMiddleware, state=app.state.drain)
    app.add_middleware(RecordingMiddleware)
    app.add_middleware(RequestIdMiddleware)


async def _on_models_busy(request: Request, exc: ModelsBusyError) -> JSONResponse:
    """503 with `Retry-After`: every loaded model is in use, none can make room."""
    record = call_record(request)
    if record is not None:
        record.error_code = exc.code
    response = error_response(exc)
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response
