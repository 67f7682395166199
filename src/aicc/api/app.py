"""`create_app(settings)`: the whole HTTP application; state is built in `lifespan`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aicc import __version__
from aicc.api import health, tokenize
from aicc.api.errors import install_error_handlers
from aicc.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from aicc.api.openai import embeddings
from aicc.api.openai import routes as openai_routes
from aicc.api.openai.chat import ChatServing
from aicc.api.openai.serving import OpenAIServing, ServingLimits
from aicc.config import Settings
from aicc.engine.grammar import GrammarCompiler
from aicc.engine.registry import create_engine
from aicc.errors import AiccError
from aicc.store.local import LocalModel, resolve_model

logger = logging.getLogger(__name__)


def create_app(settings: Settings, model: LocalModel | None = None) -> FastAPI:
    """Build the app. `model` is the resolved model file (resolved from settings if None)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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

    app = FastAPI(title="aicc", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = None
    app.state.serving = None
    app.state.chat = None
    app.state.startup_error = None
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(embeddings.router)
    app.include_router(tokenize.router)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
