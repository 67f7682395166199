"""Plain ASGI middleware: request ids, and the request body's size limit and timeout."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import secrets

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicc.api.errors import error_body
from aicc.api.observe import change_detail
from aicc.api.record import CallRecord, scope_record
from aicc.observability.logging import request_context

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Gives every request an id (the client's `x-request-id` if sane), echoes it back, and
    starts the call's `CallRecord`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # A random prefix per process and a counter: unique, and cheaper than a uuid4 a call.
        self._prefix = secrets.token_hex(10)
        self._numbers = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        if given and _REQUEST_ID.fullmatch(given):
            request_id = given
        else:
            request_id = f"{self._prefix}{next(self._numbers):012x}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["call_record"] = CallRecord(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        with request_context(request_id):  # every log line of this call carries the id
            await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length or while they stream in,
    and bodies that stall longer than `body_timeout_s` between two pieces with 408.

    The body is read here, up to the limit, and replayed to the app: the app never sees a
    partial body, a chunked upload cannot grow past the limit in memory, and a slow upload
    is cut off before any route runs (so it never holds a queue place or an engine slot).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                await self._time_out(scope, receive, send)
                return
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            scope.setdefault("state", {})["body_sha256"] = hashlib.sha256(body).hexdigest()
        record = scope_record(scope)
        if record is not None:
            record.detail = change_detail(scope, body)
        await self.app(scope, replayed(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"The request body is larger than the limit of {self.max_bytes} bytes."
        body = error_body(message, "invalid_request_error", code="payload_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)

    async def _time_out(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"The request body stalled for more than {self.body_timeout_s:g} s."
        body = error_body(message, "invalid_request_error", code="request_timeout")
        # Close: the rest of this body, whenever it comes, must not be read as a request.
        response = JSONResponse(body, status_code=408, headers={"Connection": "close"})
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower case: ASGI servers lower-case header names)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def replayed(body: bytes, receive: Receive) -> Receive:
    """`receive` for an app whose request body was read already: that body first, then the
    connection's own events (a disconnect)."""
    is_sent = False

    async def replay() -> Message:
        nonlocal is_sent
        if not is_sent:
            is_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
