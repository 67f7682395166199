"""Per-request deadlines for the API (`/v1/…`): the smaller of `request_timeout_s` and the
client's `X-Request-Timeout` header (seconds), counted from the request's arrival — auth, the
queue, the generation and the sending of the answer all count.

At the deadline the request's task is cancelled, which closes its generation (the engine aborts
the sequence and frees its KV) or its upstream call; the client gets 504 `request_timeout`, or,
when a stream has begun, a last SSE event carrying that error. The deadline (event-loop time)
is in the request's state as `deadline`, for code that passes it on (to a remote upstream).
"""

from __future__ import annotations

import asyncio
import math

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aicc.api.errors import error_body, error_response
from aicc.api.record import scope_record
from aicc.api.sse import encode_event
from aicc.errors import AiccError, InvalidRequestError, RequestTimeoutError

TIMEOUT_HEADER = "X-Request-Timeout"
MAX_TIMEOUT_S = 86400.0
"""Largest `X-Request-Timeout` accepted (the largest `request_timeout_s`)."""
_DEADLINE_PATH_PREFIX = "/v1/"


def requested_timeout_s(scope: Scope, default_s: float) -> float:
    """The request's timeout: `default_s`, lowered by a valid `X-Request-Timeout`.

    Raises InvalidRequestError for a value that is not a number of seconds in (0, 86400].
    """
    raw = next((v for k, v in scope.get("headers", ()) if k == b"x-request-timeout"), None)
    if raw is None:
        return default_s
    text = raw.decode("latin-1").strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        shown = text if len(text) <= 32 else text[:32] + "…"
        raise InvalidRequestError(
            f"The {TIMEOUT_HEADER} header must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_S:g}; got {shown!r}."
        )
    return min(value, default_s)


class DeadlineMiddleware:
    """Ends `/v1/` requests at their deadline (see the module's docstring). Sits inside the
    recording middleware, so the audit entry and the metrics see the 504 or the error event."""

    def __init__(self, app: ASGIApp, request_timeout_s: float) -> None:
        self.app = app
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_DEADLINE_PATH_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            timeout_s = requested_timeout_s(scope, self.request_timeout_s)
        except InvalidRequestError as exc:
            await _answer_error(scope, receive, send, exc)
            return
        deadline = _Deadline(timeout_s)
        scope.setdefault("state", {})["deadline"] = deadline.at
        try:
            await self.app(scope, receive, deadline.guard(send))
        except asyncio.CancelledError:
            if not deadline.is_cancelling or deadline.uncancel() > 0:
                raise  # cancelled by someone else too (the server is stopping)
            await _answer_timeout(scope, receive, send, deadline, timeout_s)
        else:
            if deadline.is_cancelling:  # the app swallowed the cancellation
                deadline.uncancel()
        finally:
            deadline.timer.cancel()


class _Deadline:
    """Cancels the request's task at the deadline, but never while a message is being sent:
    a message half handed over (the audit commit that precedes the last byte, say) must end."""

    def __init__(self, timeout_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None  # ASGI apps run in tasks
        self.task = task
        self.is_expired = False
        self.is_cancelling = False
        self._is_task_cancelled = False
        self.is_sending = False
        self.is_started = False
        """The response's start message went out."""
        self.is_complete = False
        """Its last body message went out: nothing is left to cut short."""
        self.is_event_stream = False
        loop = asyncio.get_running_loop()
        self.at = loop.time() + timeout_s
        self.timer = loop.call_at(self.at, self._expire)

    def guard(self, send: Send) -> Send:
        async def guarded_send(message: Message) -> None:
            self.is_sending = True
            try:
                await send(message)
            finally:
                self.is_sending = False
            self._note(message)
            if self.is_expired and not self.is_cancelling and not self.is_complete:
                if asyncio.current_task() is not self.task:
                    self._cancel()  # sent from a child task (a task group): cancel the parent
                    return
                # Expired during the send: end the app here (no pending cancel left behind).
                self.is_cancelling = True
                raise asyncio.CancelledError

        return guarded_send

    def _note(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.is_started = True
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-type":
                    self.is_event_stream = value.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.is_complete = True

    def _expire(self) -> None:
        self.is_expired = True
        if not self.is_sending and not self.is_complete:
            self._cancel()

    def _cancel(self) -> None:
        self.is_cancelling = True
        self._is_task_cancelled = True
        self.task.cancel()

    def uncancel(self) -> int:
        """Take back this deadline's cancellation; the cancellations still requested."""
        return self.task.uncancel() if self._is_task_cancelled else self.task.cancelling()


async def _answer_timeout(
    scope: Scope, receive: Receive, send: Send, deadline: _Deadline, timeout_s: float
) -> None:
    error = RequestTimeoutError(f"The request ran past its deadline of {timeout_s:g} s.")
    if not deadline.is_started:
        await _answer_error(scope, receive, send, error)
        return
    record = scope_record(scope)
    if record is not None:
        record.error_code = error.code
    last = b""
    if deadline.is_event_stream:  # as `sse_stream` ends a failed stream: an error, no [DONE]
        last = encode_event(error_body(error.message, error.error_type, code=error.code))
    await send({"type": "http.response.body", "body": last, "more_body": False})


async def _answer_error(scope: Scope, receive: Receive, send: Send, error: AiccError) -> None:
    record = scope_record(scope)
    if record is not None:
        record.error_code = error.code
    await error_response(error)(scope, receive, send)
