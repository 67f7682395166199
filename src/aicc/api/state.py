"""What the app holds while it runs, built in order in the lifespan and torn down in reverse:
state database + identity + quotas + audit log + model registry, then the configured model,
its engine, and the pool of models loaded on demand."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NoReturn

from fastapi import FastAPI

from aicc.api.admin.deps import Identity
from aicc.api.models import LoadedModel, ModelPool, aliases_of
from aicc.api.openai.chat import ChatServing
from aicc.api.openai.serving import OpenAIServing, ServingLimits
from aicc.auth.resolver import CredentialResolver
from aicc.auth.service import IdentityService
from aicc.auth.tokens import load_server_secret
from aicc.config import Settings
from aicc.db import Database
from aicc.engine.grammar import GrammarCompiler
from aicc.engine.registry import create_engine
from aicc.errors import AiccError, ModelLoadError, ModelNotFoundError
from aicc.quota import RateLimiter
from aicc.router.workers import running_workers
from aicc.store.crypto import ENCRYPTED_SUFFIX, ModelDecryptionError, plaintext_paths
from aicc.store.local import LocalModel, resolve_model
from aicc.store.model_keys import find_model_key
from aicc.store.registry import ModelRecord, ModelRegistry

logger = logging.getLogger(__name__)

APP_STATE_NAMES = (
    "identity", "resolver", "limiter", "audit", "registry", "engine", "serving", "chat", "pool",
    "startup_error",
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
    app.state.registry = ModelRegistry(db, settings.model_dir)
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
    for name in ("identity", "resolver", "limiter", "audit", "registry"):
        setattr(app.state, name, None)


@asynccontextmanager
async def running_model(
    app: FastAPI, settings: Settings, model: LocalModel | None
) -> AsyncIterator[None]:
    """Load the configured model, start its engine and the services routes use, and the pool
    that serves registered models beside it."""
    registry: ModelRegistry | None = app.state.registry
    compiler = GrammarCompiler()
    try:
        local = model
        if local is None:
            local = await asyncio.to_thread(
                resolve_model, settings.model, settings.model_dir, registry
            )
        served_name = settings.served_model_name or local.name
        aliases = aliases_of(served_name) if settings.served_model_name is None else frozenset()
        default = await load_model(settings, local, served_name, aliases, compiler)
    except AiccError as exc:
        compiler.close()
        app.state.startup_error = exc
        raise
    app.state.engine = default.engine
    app.state.serving = default.serving
    app.state.chat = default.chat
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.bind(default.engine, app.state.limiter, served_name)

    async def load_registered(record: ModelRecord) -> LoadedModel:
        paths = tuple(record.paths(settings.model_dir))
        local = LocalModel(record.ref, paths[0], False, paths, record.encrypted)
        return await load_model(settings, local, record.ref, aliases_of(record.ref), compiler)

    pool = ModelPool(
        default,
        registry=registry,
        load=load_registered,
        max_loaded=settings.max_loaded_models,
        poll_s=settings.model_poll_s,
        retry_after_s=settings.retry_after_s,
        default_ref=local.name if local.files else None,
        metrics=metrics,
    )
    logger.info("serving %s from %s", served_name, local.path)
    try:
        await pool.start()
        app.state.pool = pool
        yield
    finally:
        for name in ("pool", "engine", "serving", "chat"):
            setattr(app.state, name, None)
        await pool.close()
        compiler.close()
        await default.engine.shutdown()


class WorkerModels:
    """`app.state.pool` with engine workers (`workers` > 0): no model is loaded in-process.
    The configured model is the router's `workers` deployment; any other name is not found."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def default(self) -> WorkerModels:
        """For code that reads `pool.default.name` (the served model's name)."""
        return self

    @asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[NoReturn]:
        """Raises ModelNotFoundError: the routes that reach the workers never lease."""
        if name is None or name == self.name:
            message = (
                f"The model {self.name!r} runs in engine workers, which this route does not "
                "reach; use /v1/chat/completions, /v1/completions or /v1/embeddings"
            )
        else:
            message = (
                f"The model {name!r} is not served here: with engine workers this server "
                f"serves only {self.name!r} (GET /v1/models)"
            )
        raise ModelNotFoundError(message, param="model")
        yield  # pragma: no cover (a generator for asynccontextmanager)

    def cards(self) -> list[dict[str, Any]]:
        """None: the router lists the workers' model."""
        return []

    def card(self, name: str) -> dict[str, Any]:
        raise ModelNotFoundError(
            f"The model {name!r} does not exist; GET /v1/models lists the models served here",
            param="model",
        )


@asynccontextmanager
async def running_worker_models(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """The engine workers (`running_workers`) instead of an in-process model; the router
    serves their model (`Router.serve_workers`)."""
    async with running_workers(app, settings):
        supervisor = app.state.workers
        name = settings.served_model_name or supervisor.model_spec.name
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.bind(None, app.state.limiter, name)
        logger.info("serving %s from %d engine workers", name, settings.workers)
        app.state.pool = WorkerModels(name)
        try:
            yield
        finally:
            app.state.pool = None


async def load_model(
    settings: Settings,
    local: LocalModel,
    served_name: str,
    aliases: frozenset[str],
    compiler: GrammarCompiler,
) -> LoadedModel:
    """Start an engine on `local` (decrypted into memory when encrypted) and its services.

    Raises ModelLoadError (llama.cpp failed), ModelDecryptionError (no or wrong key, damaged
    file), ConfigError (unreadable or malformed key); messages name the model.
    """
    key = await asyncio.to_thread(find_model_key, settings) if local.is_encrypted else None
    files = list(local.files) or [local.path]
    try:
        async with _plaintext_model(files, key) as path:
            engine = create_engine(settings, path, served_name)
            await engine.start()
    except ModelDecryptionError as exc:
        raise ModelDecryptionError(f"cannot load model {local.name!r}: {exc.message}") from None
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot load model {local.name!r}: {exc.message}") from None
    limits = ServingLimits(settings.max_stop_strings, settings.max_n)
    serving = OpenAIServing(engine, served_name, limits, aliases)
    chat = ChatServing(serving, compiler, reasoning_parser=settings.reasoning_parser)
    return LoadedModel(served_name, engine, serving, chat)


@asynccontextmanager
async def _plaintext_model(files: list[Path], key: bytes | None) -> AsyncIterator[Path]:
    """The path llama.cpp opens for `files` (part 1 of a multi-part model). Encrypted files
    are decrypted into memfds (off the event loop), closed again once the block ends: a loaded
    model keeps its mapped pages."""
    manager = plaintext_paths(files, key)
    paths = await asyncio.to_thread(manager.__enter__)
    try:
        if len(paths) == 1 or paths == files:
            yield paths[0]
        else:
            with _split_aliases(files, paths) as first:
                yield first
    finally:
        manager.__exit__(None, None, None)


@contextmanager
def _split_aliases(files: list[Path], paths: list[Path]) -> Iterator[Path]:
    """llama.cpp finds a split model's parts beside part 1 by their names
    (`x-00002-of-00003.gguf`), which memfds lack: a private directory of links, named as the
    plaintext files, to the decrypted parts (the links hold no model bytes)."""
    with tempfile.TemporaryDirectory(prefix="aicc-parts-") as directory:
        links = []
        for file, path in zip(files, paths, strict=True):
            link = Path(directory) / file.name.removesuffix(ENCRYPTED_SUFFIX)
            link.symlink_to(path)
            links.append(link)
        yield links[0]
