"""The recording middleware: one `CallRecord` per call, handed to the audit log, the metrics
and the access log when the response is complete.

Durability: the audit entry is committed *before* the last response byte is sent, so a client
that got its answer is always in the log (a crash right after loses nothing acknowledged). For
streams an "open call" row is sent to the log as the headers go out, and the entry closes it at
the end — or at the disconnect. A relayed stream whose record is complete before its end (the
upstream's usage came; `RECORD_FINAL`) starts its commit then; the end still waits for it,
but once it is committed the end goes out at once, before the app's own cleanup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicc.api.disconnect import ClientDisconnected
from aicc.api.errors import error_response
from aicc.api.record import RECORD_FINAL, CallOutcome, CallRecord, scope_record
from aicc.errors import AiccError

logger = logging.getLogger(__name__)

UNAUDITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes: machines polling every few seconds, not API calls."""

_SECRET_FIELDS = frozenset(
    {
        "password", "old_password", "new_password", "totp_code", "code", "key", "token",
        "api_key", "admin_key", "secret_key", "bind_password",
    }
)  # fmt: skip
"""Masked wherever they appear in an audited request (nested objects and lists too)."""
_MASK = "***"
_MAX_MASK_DEPTH = 32
"""Deeper values are masked whole: the audit detail never holds what was not inspected."""
_CLIENT_GONE = 499


class AuditSink(Protocol):
    async def open_call(self, record: CallRecord, outcome: CallOutcome) -> None: ...

    def start_append(self, record: CallRecord, outcome: CallOutcome) -> asyncio.Future[None]:
        """The call's entry, sent now; the future resolves once it is committed (raises
        AuditWriteError when it cannot be)."""
        ...


class MetricsSink(Protocol):
    def observe_call(self, record: CallRecord, outcome: CallOutcome) -> None: ...


class CallLogger(Protocol):
    def __call__(self, record: CallRecord, outcome: CallOutcome) -> None: ...


class RecordingMiddleware:
    """Runs inside `RequestIdMiddleware` (which creates the record) and outside the body limit
    (which reads the body and hashes it). Sinks are read from `app.state` per call, so they
    can be created in the lifespan.

    With the audit log on, a call's last body message (and the start of a plain response) is
    held until the app has returned, then sent once the entry is committed: the app's objects
    are freed before the wait (fewer live objects for the garbage collector), headers and
    body leave together, and a failed commit can still be answered 503 instead of a 200 whose
    body never comes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = scope_record(scope)
        if scope["type"] != "http" or record is None:
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        audit: AuditSink | None = getattr(state, "audit", None)
        if scope["path"] in UNAUDITED_PATHS:
            audit = None
        status = 0
        held_start: Message | None = None
        held_end: Message | None = None
        """The last body message: the app has finished its response."""
        early: asyncio.Future[None] | None = None
        """The entry's commit, started before the end (`RECORD_FINAL`)."""

        is_ended = False
        """The last body message went out before the app returned (its commit was early)."""
        ended: CallOutcome | None = None
        """The outcome as the client had it then (its latency), when `is_ended`."""

        async def recording_send(message: Message) -> None:
            nonlocal status, held_start, held_end, early, is_ended, ended
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if audit is not None:
                    if record.is_stream and status < 300:
                        await audit.open_call(record, _outcome(scope, record, status))
                    elif _has_length(message):  # one body message follows: keep them together
                        held_start = message
                        return
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                held_end = message
                if audit is not None:
                    if early is None or not await _committed(early):
                        return  # sent once the app has returned and the entry is committed
                    is_ended = True  # its entry is committed: the end need not wait for
                    # the app to finish (closing the upstream, metering); failed: held
            elif audit is not None and early is None and message.get(RECORD_FINAL):
                outcome = _outcome(scope, record, status)
                early = audit.start_append(record, outcome)
            if held_start is not None:
                start, held_start = held_start, None
                await send(start)
            await send(message)
            if is_ended:
                ended = _outcome(scope, record, status)

        is_audited = False
        try:
            await self.app(scope, receive, recording_send)
        except ClientDisconnected:
            status = status or _CLIENT_GONE  # nobody to answer; not a server error
        finally:
            try:
                if is_ended:
                    is_audited = True
                elif audit is not None and held_end is not None:
                    is_audited = True
                    held = (held_start, held_end)
                    status = await _commit_and_send(
                        audit, record, scope, receive, send, status, held, early
                    )
            finally:
                # Unfinished: the client went away mid-response, or the app failed before a byte.
                final_status = status if held_end is not None else (_CLIENT_GONE if status else 500)
                final = ended or _outcome(scope, record, final_status)
                if audit is not None and not is_audited:
                    await _append_quietly(audit, record, final, early)
                _observe(state, record, final)


async def _commit_and_send(
    audit: AuditSink,
    record: CallRecord,
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    held: tuple[Message | None, Message],
    early: asyncio.Future[None] | None,
) -> int:
    """Commit the call's entry (or wait for the commit started `early`), then send the held
    messages; the status sent. A failed commit before the headers went out is answered with
    its error (503) instead; after them it is raised (the server cuts the connection: the
    client never sees the response end).
    """
    start, end = held
    try:
        await (
            early
            if early is not None
            else audit.start_append(record, _outcome(scope, record, status))
        )
    except AiccError as exc:
        if start is None:
            raise
        record.error_code = exc.code
        await error_response(exc)(scope, receive, send)
        return exc.status_code
    if start is not None:
        await send(start)
    await send(end)
    return status


async def _committed(early: asyncio.Future[None]) -> bool:
    """Whether the commit started early succeeded (waiting for it; a failure is answered
    where the end was held, as for any commit). Awaited directly, not shielded: a call
    cancelled meanwhile cancels only its wait (the writer commits the entry regardless)."""
    try:
        await early
    except Exception:
        return False
    return True


def _has_length(start: Message) -> bool:
    return any(name == b"content-length" for name, _ in start.get("headers", ()))


def _outcome(scope: Scope, record: CallRecord, status: int) -> CallOutcome:
    route = scope.get("route")
    client = scope.get("client")
    return CallOutcome(
        method=scope["method"],
        route=str(getattr(route, "path", "")),
        path=scope["path"],
        status=status,
        latency_s=time.perf_counter() - record.started,
        client_addr=client[0] if client else None,
        body_sha256=scope.get("state", {}).get("body_sha256"),
    )


async def _append_quietly(
    audit: AuditSink,
    record: CallRecord,
    outcome: CallOutcome,
    early: asyncio.Future[None] | None,
) -> None:
    """Commit the entry of a call that did not end normally (or wait for the commit started
    early, which then stands for it)."""
    try:
        await (early if early is not None else audit.start_append(record, outcome))
    except Exception:  # the response is gone already; the failure must be seen, not raised
        logger.exception("audit entry for request %s could not be written", record.request_id)


def _observe(state: Any, record: CallRecord, outcome: CallOutcome) -> None:
    metrics: MetricsSink | None = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.observe_call(record, outcome)
    log_call: CallLogger | None = getattr(state, "log_call", None)
    if log_call is not None:
        log_call(record, outcome)


def change_detail(scope: Scope, body: bytes) -> dict[str, Any] | None:
    """What an administrative call asked for, secrets masked (None for other calls)."""
    path = scope["path"]
    if scope["method"] == "GET" or not path.startswith(("/admin/", "/auth/")):
        return None
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        return None
    if path == "/auth/login":  # who tried to log in; never the password or code
        return {"username": str(parsed.get("username", ""))[:256]}
    return {"request": _masked(parsed, 0)}


def _masked(value: Any, depth: int) -> Any:
    """`value` with every secret field's value replaced by `_MASK`, at any depth."""
    if isinstance(value, dict | list) and depth >= _MAX_MASK_DEPTH:
        return _MASK
    if isinstance(value, dict):
        return {
            k: (_MASK if k in _SECRET_FIELDS else _masked(v, depth + 1)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_masked(item, depth + 1) for item in value]
    return value
