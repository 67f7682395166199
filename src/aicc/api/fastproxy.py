"""The relay's short way: calls to deployments served only by other servers skip the router.

A call a remote replica answers needs from this process what the routes' dependencies do —
authenticate, check the permission and the model, take a generation lease, validate, choose a
variant and a replica — and then the proxy. Done through FastAPI's routing, dependency
injection and response machinery, that cost more than a millisecond of the event loop per call
(half of what the gateway added to a proxied request). `ProxyShortcut` runs below the request
middlewares (so ids, audit, metrics, drain, deadlines and body limits apply unchanged) and
calls the same functions the dependencies call; every other request, and any body it cannot
take whole (not JSON, no deployment's model), goes on to the app untouched.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from aicc.api.access import InferenceCaller, checked_body, open_caller
from aicc.api.errors import aicc_error_response, validation_error_response
from aicc.api.middleware import replayed
from aicc.api.openai import routes as openai_routes
from aicc.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from aicc.api.openai.routes import dispatch, routed_call
from aicc.auth.deps import check_permission, current_principal
from aicc.auth.permissions import Permission
from aicc.errors import AiccError
from aicc.router.service import Router

_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


class ProxyShortcut:
    """Serves POST /v1/chat/completions and /v1/completions for remote-only deployments."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: dict[str, BaseRoute | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        router: Router | None = getattr(scope["app"].state, "router", None) if path else None
        if router is None or scope["method"] != "POST" or path not in _BODIES:
            await self.app(scope, receive, send)
            return
        names = router.remote_only_models()
        if not names:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        raw = await request.body()
        # Parsed here only when it may name one (a plain search): the app parses it again.
        mentioned = any(b'"%s"' % name.encode() in raw for name in names)
        body = await _json_object(request) if mentioned else None
        model = body.get("model") if body is not None else None
        if body is None or model not in names:
            await self.app(scope, replayed(raw, receive), send)
            return
        assert isinstance(model, str)
        scope["route"] = self._route(path)  # for metrics and logs, as routed calls
        response, caller = await self._respond(request, router, model, path)
        try:
            await response(scope, receive, send)
        finally:
            if caller is not None:
                caller.usage.release()  # after the last byte, as the route's lease

    async def _respond(
        self, request: Request, router: Router, model: str, path: str
    ) -> tuple[Response, InferenceCaller | None]:
        """The response (errors answered as the app's handlers would) and the caller whose
        lease to release once it has been sent. The request's JSON is parsed (and cached on
        it) already: every step below reads that one parse."""
        caller: InferenceCaller | None = None
        try:
            principal = await current_principal(request)
            check_permission(principal, Permission.INFERENCE)
            body = await checked_body(request, principal)
            try:
                _BODIES[path].model_validate(body)
            except ValidationError as exc:
                return validation_error_response(request, exc.errors()), None
            caller = open_caller(request, principal, body)
            call = routed_call(request, router, model, principal)
            return await dispatch(request, caller, call, path), caller
        except AiccError as exc:
            return aicc_error_response(request, exc), caller
        except BaseException:
            if caller is not None:
                caller.usage.release()
            raise

    def _route(self, path: str) -> BaseRoute | None:
        """The route that serves `path` otherwise (its path labels metrics and logs)."""
        if path not in self._routes:
            found = [
                r
                for r in openai_routes.router.routes
                if getattr(r, "path", None) == path and "POST" in (getattr(r, "methods", ()) or ())
            ]
            self._routes[path] = found[0] if found else None
        return self._routes[path]


async def _json_object(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None
