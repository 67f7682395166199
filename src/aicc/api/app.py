"""`create_app(settings)`: the whole HTTP application; state is built in `lifespan`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aicc import __version__
from aicc.api import health, tokenize
from aicc.api.admin import account, keys, roles, users
from aicc.api.admin import config as config_routes
from aicc.api.admin.deps import Identity
from aicc.api.errors import install_error_handlers
from aicc.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from aicc.api.openai import embeddings
from aicc.api.openai import routes as openai_routes
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
        try:
            db = await asyncio.to_thread(open_state, settings, on_bootstrap_key, app)
        except AiccError as exc:
            app.state.startup_error = exc
            raise
        app.state.limiter.start()
        try:
            async with serve_model(app):
                yield
        finally:
            limiter: RateLimiter | None = app.state.limiter
            if limiter is not None:
                await limiter.close()
            app.state.identity = app.state.resolver = app.state.limiter = None
            db.close()

    @asynccontextmanager
    async def serve_model(app: FastAPI) -> AsyncIterator[None]:
        local = model
        if local is None:
            local = await asyncio.to_thread(resolve_model, settings.model, settings.model_dir)
        served_name = settings.served_model_name or local.name
        engine = create_engine(settings, local.path, served_name)
        try:
            await engine.start()
        except AiccError as exc:
            app.state.startup_error = exc  # the CLI reports it; uvicorn only logs it
            raise
        app.state.engine = engine
        limits = ServingLimits(settings.max_stop_strings, settings.max_n)
        serving = OpenAIServing(engine, served_name, limits)
        compiler = GrammarCompiler()
        app.state.serving = serving
        app.state.chat = ChatServing(serving, compiler, reasoning_parser=settings.reasoning_parser)
        logger.info("serving %s from %s", served_name, local.path)
        try:
            yield
        finally:
            app.state.engine = None
            app.state.serving = None
            app.state.chat = None
            compiler.close()
            await engine.shutdown()

    # No /docs or /openapi.json: every route is authenticated or listed public, and these
    # would be neither. `aicc` serves OpenAI's documented API.
    app = FastAPI(
        title="aicc",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.identity = None
    app.state.resolver = None
    app.state.limiter = None
    app.state.engine = None
    app.state.serving = None
    app.state.chat = None
    app.state.startup_error = None
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(embeddings.router)
    app.include_router(tokenize.router)
    for module in (account, users, keys, roles, config_routes):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app


def open_state(
    settings: Settings, on_bootstrap_key: Callable[[str], None] | None, app: FastAPI
) -> Database:
    """Migrate the state database, make sure the built-in roles and a first admin exist, and
    put the identity services on `app.state`."""
    db = Database(settings.resolved_database_url)
    try:
        db.migrate()
        ldap = None
        if settings.ldap is not None:
            from aicc.auth.ldap import LdapAuthenticator

            ldap = LdapAuthenticator(settings.ldap)
        service = IdentityService(db, settings, load_server_secret(settings), ldap)
        service.ensure_builtin_roles()
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        new_key = service.bootstrap_admin(admin_key)
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
