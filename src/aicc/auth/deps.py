"""FastAPI dependencies: the caller's principal, and one permission check per route.

Every route declares `require(Permission.X)` (or is listed in `PUBLIC_ROUTES`); a test walks
`app.routes` so that a new route without either fails the suite. The path used for decisions
is the routed one, never the Host header or a raw string prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request

from aicc.api.record import call_record
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.auth.resolver import CredentialResolver
from aicc.errors import AuthenticationError, EngineUnavailableError, PermissionDeniedError

PUBLIC_ROUTES = frozenset({("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/auth/login")})
"""(method, path) pairs that need no credential."""

PUBLIC_IF_CONFIGURED = frozenset({("GET", "/metrics")})
"""Public only when a setting says so (`metrics_public`)."""

_TOKEN = re.compile(r"^aicc-s[kt]-[A-Za-z0-9_-]{16,248}$")


def presented_credential(request: Request) -> str | None:
    """The token from `Authorization: Bearer …` or `x-api-key`, if any."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.headers.get("x-api-key")


async def current_principal(request: Request) -> Principal:
    """The authenticated caller; 401 (the same answer for missing, malformed, unknown, expired
    or revoked credentials, so that probing learns nothing)."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    token = presented_credential(request)
    if not token:
        raise AuthenticationError(
            "No API key provided: send `Authorization: Bearer <key>` (or `x-api-key`)."
        )
    resolver: CredentialResolver | None = getattr(request.app.state, "resolver", None)
    if resolver is None:
        raise EngineUnavailableError("the server is starting; retry shortly")
    principal = await resolver.resolve(token) if _TOKEN.fullmatch(token) else None
    if principal is None:
        raise AuthenticationError("Invalid API key or session token, or it was revoked.")
    request.state.principal = principal
    record = call_record(request)
    if record is not None:
        record.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


AUTHENTICATED = "authenticated"
"""What `require(None)` checks: any valid credential (one's own session, password, TOTP)."""


def require(
    permission: Permission | None,
    *,
    also_admit: Callable[[Request, Principal], bool] | None = None,
) -> Any:
    """The dependency that admits only callers holding `permission` (403 otherwise); None
    admits every authenticated caller. `also_admit` can admit others by a setting (e.g. admins
    reading the audit log when `audit_admin_read` is on)."""

    async def check(request: Request, principal: CurrentPrincipal) -> Principal:
        try:
            check_permission(principal, permission)
        except PermissionDeniedError:
            if also_admit is None or not also_admit(request, principal):
                raise
        return principal

    check.required_permission = permission or AUTHENTICATED  # type: ignore[attr-defined]
    return Depends(check)


def check_permission(principal: Principal, permission: Permission | None) -> None:
    """Raise PermissionDeniedError unless `principal` holds `permission` (None: any)."""
    if permission is not None and not principal.can(permission):
        raise PermissionDeniedError(
            f"Your credential lacks the {permission!s} permission for this route."
        )


def required_permission(call: Callable[..., Coroutine[Any, Any, Any]]) -> str | None:
    """What a dependency made by `require` checks: a permission, `AUTHENTICATED`, or None
    for callables that check nothing."""
    value = getattr(call, "required_permission", None)
    return str(value) if isinstance(value, str) else None
