"""The router's life in the app: built at start from the settings (and the stored API-made
deployments), wired to the audit log, the metrics and the model pool, closed at the end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from aicc.auth.principal import Principal
from aicc.auth.tokens import load_server_secret
from aicc.db import Database
from aicc.errors import ConfigError, ModelNotFoundError
from aicc.router.service import Router

if TYPE_CHECKING:
    from fastapi import FastAPI

    from aicc.config import Settings
    from aicc.router.workers import WorkerSupervisor


@contextlib.asynccontextmanager
async def running_router(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """`app.state.router` while the app runs: whenever the app has a state database (so a
    deployment can be made at run time), else only with deployments or engine workers."""
    app.state.router = None
    workers: WorkerSupervisor | None = getattr(app.state, "workers", None)
    registry = getattr(app.state, "registry", None)
    database: Database | None = registry.database if registry is not None else None
    if not settings.deployments and workers is None and database is None:
        yield
        return
    secret: bytes | None = None
    if database is not None:
        secret = await asyncio.to_thread(load_server_secret, settings)
    router = Router.from_settings(
        settings.deployments,
        health_check_s=settings.health_check_s,
        eject_s=settings.replica_eject_s,
        retry_after_s=settings.retry_after_s,
        database=database,
        secret=secret,
        drain_timeout_s=settings.drain_timeout_s,
    )
    router.is_served_here = lambda name: _is_served_here(app, name)
    unsubscribe: Callable[[], None] | None = None
    if workers is not None:
        name = settings.served_model_name or workers.model_spec.name
        try:
            unsubscribe = router.serve_workers(name, workers)
        except ConfigError as exc:
            await router.close()
            app.state.startup_error = exc
            raise
    audit = getattr(app.state, "audit", None)
    if audit is not None:

        async def audit_event(action: str, who: Principal | None, detail: dict[str, Any]) -> None:
            await audit.append_event(action=action, principal=who, detail=detail)

        router.audit_event = audit_event
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        for name in router.names:
            metrics.add_model_label(name)
        router.on_new_model = metrics.add_model_label
    await router.start()
    app.state.router = router
    try:
        yield
    finally:
        app.state.router = None
        if unsubscribe is not None:
            unsubscribe()
        await router.close()


def _is_served_here(app: FastAPI, name: str) -> bool:
    """Whether the model pool serves or can load `name` (the configured or a registered model)."""
    pool = getattr(app.state, "pool", None)
    if pool is None:
        return False
    try:
        pool.card(name)
    except ModelNotFoundError:
        return False
    return True
