"""What the app holds while it runs, built in order in the lifespan and torn down in reverse:
state database + identity + quotas + audit log, then the model and the engine."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from aicc.api.admin.deps import Identity
from aicc.api.openai.chat import ChatServing
from aicc.api.openai.serving import OpenAIServing, ServingLimits
from aicc.auth.resolver import CredentialResolver
from aicc.auth.service import IdentityService
from aicc.auth.tokens import load_server_secret
from aicc.config import Settings
from aicc.db import Database
from aicc.engine.grammar import GrammarCompiler
from aicc.engine.registry import create_engine
from aicc.errors import AiccError
from aicc.quota import RateLimiter
from aicc.store.local import LocalModel, resolve_model

logger = logging.getLogger(__name__)

APP_STATE_NAMES = (
    "identity", "resolver", "limiter", "audit", "engine", "serving", "chat", "startup_error",
)  # fmt: skip


def open_state(
    settings: Settings, on_bootstrap_key: Callable[[str], None] | None, app: FastAPI
) -> Database:
    """Migrate the state database, make sure the built-in roles and a first admin exist, and
    put the identity, quota and audit services on `app.state`."""
    db = Database(settings.resolved_database_url)
    try:
        db.migrate()
        ldap = None
        if settings.ldap is not None:
            from aicc.auth.ldap import LdapAuthenticator

            ldap = LdapAuthenticator(settings.ldap)
        secret = load_server_secret(settings)
        service = IdentityService(db, settings, secret, ldap)
        service.ensure_builtin_roles()
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        new_key = service.bootstrap_admin(admin_key)
        if settings.audit_enabled:
            from aicc.audit import AuditLog

            metrics = getattr(app.state, "metrics", None)
            on_commit = metrics.observe_audit_commit if metrics is not None else None
            app.state.audit = AuditLog(db, settings, secret, on_commit=on_commit)
    except BaseException:
        db.close()
        raise
    if new_key is not None and admin_key is None and on_bootstrap_key is not None:
        on_bootstrap_key(new_key)
    resolver = CredentialResolver(service, settings.auth_cache_s)
    app.state.resolver = resolver
    app.state.identity = Identity(service, resolver)
    app.state.limiter = RateLimiter(db)
    return db


@asynccontextmanager
async def running_state(
    app: FastAPI, settings: Settings, on_bootstrap_key: Callable[[str], None] | None
) -> AsyncIterator[None]:
    """Identity, quotas, audit (the audit log closes last: it records until the end)."""
    try:
        db = await asyncio.to_thread(open_state, settings, on_bootstrap_key, app)
    except AiccError as exc:
        app.state.startup_error = exc  # the CLI reports it; uvicorn only logs it
        raise
    async with AsyncExitStack() as stack:
        stack.callback(db.close)
        audit = app.state.audit
        if audit is not None:
            from aicc.audit import RetentionTask

            await audit.start()
            stack.push_async_callback(audit.close)
            retention = RetentionTask(audit, settings)
            retention.start()
            stack.push_async_callback(retention.close)
        limiter: RateLimiter = app.state.limiter
        limiter.start()
        stack.push_async_callback(limiter.close)
        yield
    for name in ("identity", "resolver", "limiter", "audit"):
        setattr(app.state, name, None)


@asynccontextmanager
async def running_model(
    app: FastAPI, settings: Settings, model: LocalModel | None
) -> AsyncIterator[None]:
    """Load the model, start the engine, and the services routes use."""
    local = model
    if local is None:
        local = await asyncio.to_thread(resolve_model, settings.model, settings.model_dir)
    served_name = settings.served_model_name or local.name
    engine = create_engine(settings, local.path, served_name)
    try:
        await engine.start()
    except AiccError as exc:
        app.state.startup_error = exc
        raise
    app.state.engine = engine
    limits = ServingLimits(settings.max_stop_strings, settings.max_n)
    serving = OpenAIServing(engine, served_name, limits)
    compiler = GrammarCompiler()
    app.state.serving = serving
    app.state.chat = ChatServing(serving, compiler, reasoning_parser=settings.reasoning_parser)
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.bind(engine, app.state.limiter, served_name)
    logger.info("serving %s from %s", served_name, local.path)
    try:
        yield
    finally:
        app.state.engine = None
        app.state.serving = None
        app.state.chat = None
        compiler.close()
        await engine.shutdown()
