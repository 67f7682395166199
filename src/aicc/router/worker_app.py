"""The engine worker's app (`aicc serve --role engine`): the OpenAI routes, tokenization,
health and engine metrics of one model, for a gateway on the same machine.

No users, audit or quotas of its own (the gateway authenticates, audits and meters): every
route but the probes takes one internal bearer token. The routes and request middlewares
(drain on SIGTERM, deadlines, body size and time limits) are the gateway's own; only the
credential check is replaced (a FastAPI dependency override), so both serve the same API.
"""

from __future__ import annotations

import gc
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request

from aicc.api import health, tokenize
from aicc.api import metrics as metrics_routes
from aicc.api.app import add_request_middlewares, bare_app
from aicc.api.openai import embeddings
from aicc.api.openai import routes as openai_routes
from aicc.api.record import call_record
from aicc.api.state import running_model
from aicc.auth.deps import current_principal, presented_credential
from aicc.auth.permissions import Permission
from aicc.auth.principal import Limits, Principal
from aicc.config import Settings
from aicc.errors import AuthenticationError, InvalidRequestError
from aicc.quota import RateLimiter
from aicc.store.local import LocalModel

__all__ = ["TENANT_HEADER", "create_worker_app"]

TENANT_HEADER = "x-aicc-tenant"
"""The gateway's caller's prefix-cache tenant (`Principal.tenant`, `user:<id>`): a worker
then keeps tenants' cached prompts apart as the gateway's own engine would. The gateway must
set it itself, never pass on a client's."""

_TENANT = re.compile(r"^user:([0-9]{1,18})$")
_GATEWAY_USER_ID = 0
"""The tenant of calls that name none."""


def create_worker_app(settings: Settings, model: LocalModel | None, token: str) -> FastAPI:
    """Build the worker's app. `model` is the resolved model file (resolved from settings if
    None); `token` is what callers must send as `Authorization: Bearer`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            metrics = app.state.metrics
            if metrics is not None:
                stack.callback(metrics.close)
            await stack.enter_async_context(running_model(app, settings, model))
            gc.freeze()  # as the gateway does: keep start-up's objects out of collections
            yield

    app = bare_app(settings, "aicc engine worker", lifespan)
    # Unlimited principals only: the limiter just counts streams (metrics), in memory.
    app.state.limiter = RateLimiter(None)
    app.dependency_overrides[current_principal] = token_principal(token)
    app.include_router(health.router)
    app.include_router(openai_routes.router)
    app.include_router(embeddings.router)
    app.include_router(tokenize.router)
    if settings.metrics_enabled:
        app.include_router(metrics_routes.router)
    add_request_middlewares(app, settings)
    return app


def token_principal(token: str) -> Callable[[Request], Awaitable[Principal]]:
    """The dependency that admits only callers presenting `token` (401 otherwise) as the
    gateway: inference and metrics on every model, in the tenant the call names."""
    if not token:
        raise ValueError("the worker token must not be empty")
    expected = token.encode()

    async def gateway_principal(request: Request) -> Principal:
        presented = presented_credential(request)
        if not presented or not hmac.compare_digest(presented.encode(), expected):
            raise AuthenticationError("Invalid or missing worker token.")
        principal = _gateway(request.headers.get(TENANT_HEADER))
        record = call_record(request)
        if record is not None:
            record.principal = principal
        return principal

    return gateway_principal


def _gateway(tenant: str | None) -> Principal:
    """The gateway, calling for `tenant`'s user (none named: user 0).

    Raises `InvalidRequestError` for a tenant that is not `user:<id>`: merging it into
    another tenant would share cached prompts across users.
    """
    user_id = _GATEWAY_USER_ID
    if tenant is not None:
        match = _TENANT.fullmatch(tenant)
        if match is None:
            raise InvalidRequestError(
                f"the {TENANT_HEADER} header must be `user:<id>`", param=TENANT_HEADER
            )
        user_id = int(match.group(1))
    return Principal(
        user_id=user_id,
        username="gateway",
        roles=("gateway",),
        permissions=frozenset({Permission.INFERENCE, Permission.METRICS_READ}),
        models=("*",),
        via="key",
        credential_id="worker-token",
        user_limits=Limits(),
    )
