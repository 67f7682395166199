"""An answer from a remote upstream, read under deadlines; the errors it can end in."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Literal

from aicc.errors import AiccError
from aicc.router.http1 import Http1Response, TransportError
from aicc.router.sse import DONE_DATA, SseFramer, SseFramingError, StreamFacts, event_data

if TYPE_CHECKING:
    from aicc.router.remote import RemoteUpstream

ErrorKind = Literal["connect", "timeout", "http", "protocol", "closed"]

# Answer headers the client may see; hop-by-hop ones, cookies and framing never pass.
_PASSED_HEADERS = frozenset({"content-type", "cache-control", "retry-after"})
_PASSED_PREFIXES = ("x-ratelimit-", "openai-")
_MAX_ERROR_BODY_BYTES = 64 * 1024
_END_WAIT_S = 0.1
"""How long a finished stream waits for its body's end, to keep the connection for reuse."""
_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class UpstreamError(AiccError):
    """A remote replica failed. `retryable`: nothing reached the client yet, so the request
    may go to another replica. The message names the upstream by host:port only."""

    error_type = "server_error"

    def __init__(self, message: str, *, kind: ErrorKind, retryable: bool, upstream: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.upstream = upstream
        self.status_code = 504 if kind == "timeout" else 502
        self.code = "upstream_timeout" if kind == "timeout" else "upstream_error"


def upstream_error(
    upstream: RemoteUpstream, kind: ErrorKind, reason: str, *, retryable: bool
) -> UpstreamError:
    address = upstream.address
    return UpstreamError(
        f"upstream {address} {reason}", kind=kind, retryable=retryable, upstream=address
    )


class UpstreamResponse:
    """An upstream's answer whose headers have arrived.

    `is_stream`: a 2xx answer to a stream request — read it with `chunks()`; anything else
    with `read()`/`json()`. `facts` holds what was measured so far; `bytes_sent_to_client`
    counts what was handed on, so `can_retry` tells whether another replica may still answer.
    """

    def __init__(
        self,
        response: Http1Response,
        upstream: RemoteUpstream,
        *,
        started: float,
        wants_stream: bool,
        drop_usage: bool,
    ) -> None:
        self._response = response
        self._upstream = upstream
        self.status = response.status_code
        self.is_stream = wants_stream and response.is_success
        self.headers = {
            name: value
            for name, value in response.headers.items()
            if name in _PASSED_HEADERS or name.startswith(_PASSED_PREFIXES)
        }
        self.upstream_request_id = response.headers.get("x-request-id")
        self.started = started
        self.facts = StreamFacts()
        self.bytes_sent_to_client = 0
        self._drop_usage = drop_usage
        self._body: bytes | None = None
        self._json: dict[str, Any] | None = None

    @property
    def can_retry(self) -> bool:
        return self.bytes_sent_to_client == 0

    async def chunks(self) -> AsyncGenerator[bytes]:
        """The stream's SSE events one by one (see `event_batches`)."""
        batches = self.event_batches()
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()

    async def event_batches(self) -> AsyncGenerator[list[bytes]]:
        """The stream's SSE events, each passed on unchanged, `data: [DONE]` last; those that
        arrived together come together (one write to the client, not one each). The batch of
        the final usage comes even when dropping that chunk left it empty.

        Raises `UpstreamError`: `timeout`, `closed` (ended before `[DONE]`) or `protocol` (not
        OpenAI's events); `retryable` only while nothing was yielded. Closing the iterator
        early closes the connection, which tells the upstream to stop.
        """
        if not self.is_stream:
            raise RuntimeError("event_batches() reads stream answers; use read() or json()")
        framer = SseFramer()
        try:
            while not self.facts.is_done:
                data = await self._next_read(has_output=self.bytes_sent_to_client > 0)
                if data is None:
                    raise self._fail("closed", "ended the stream before [DONE]")
                try:
                    events = framer.feed(data)
                except SseFramingError as exc:
                    raise self._fail("protocol", f"sent a broken event stream ({exc})") from None
                batch: list[bytes] = []
                had_usage = self.facts.has_final_usage
                try:
                    for event in events:
                        if self._is_dropped(event):
                            continue
                        self.bytes_sent_to_client += len(event)  # errors after it: no retry
                        batch.append(event)
                        if self.facts.is_done:
                            break
                except UpstreamError:
                    if batch:
                        yield batch
                    raise
                if batch or self.facts.has_final_usage != had_usage:
                    yield batch  # (empty: the usage the client did not ask for came alone)
        finally:
            if self.facts.is_done:  # the body's end follows [DONE]: keep the connection
                await self._response.finish(_END_WAIT_S)
            await self.aclose()

    async def read(self) -> bytes:
        """The whole (non-streamed) answer, checked to be a JSON object."""
        if self._body is None:
            parts: list[bytes] = []
            size = 0
            try:
                while (data := await self._next_read(has_output=True)) is not None:
                    size += len(data)
                    if size > self._upstream.max_response_bytes:
                        limit = self._upstream.max_response_bytes
                        raise self._fail("protocol", f"sent an answer over {limit} bytes")
                    parts.append(data)
            finally:
                await self.aclose()
            body = b"".join(parts)
            self._json = self._parse_body(body)
            self._body = body
            self.bytes_sent_to_client = len(body)
        return self._body

    async def json(self) -> dict[str, Any]:
        """The answer as JSON. A 4xx answer that is not JSON becomes an OpenAI-style error."""
        await self.read()
        assert self._json is not None
        return self._json

    async def error_detail(self) -> str:
        """': <the upstream's error message>' of a failed answer, or '' (never raises)."""
        try:
            async with asyncio.timeout(self._upstream.idle_timeout_s):
                body = b""
                while (data := await self._response.next_chunk()) is not None:
                    body += data
                    if len(body) > _MAX_ERROR_BODY_BYTES:
                        break
            error = json.loads(body).get("error")
            message = error.get("message") if isinstance(error, dict) else error
            return f": {str(message)[:300]}" if message else ""
        except (TransportError, TimeoutError, ValueError, AttributeError):
            return ""
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _next_read(self, *, has_output: bool) -> bytes | None:
        """The next bytes of the body (None at its end), within the deadlines."""
        upstream = self._upstream
        now = time.perf_counter()
        if self.is_stream and not has_output:
            wait_s = self.started + upstream.first_byte_timeout_s - now
            reason = f"sent no event within {upstream.first_byte_timeout_s:g} s"
        else:
            wait_s = upstream.idle_timeout_s
            reason = f"sent nothing for {upstream.idle_timeout_s:g} s"
        total_left_s = self.started + upstream.total_timeout_s - now
        if total_left_s < wait_s:
            wait_s = total_left_s
            reason = f"did not finish within {upstream.total_timeout_s:g} s"
        try:
            return await self._response.next_chunk(max(wait_s, 0.0))
        except TimeoutError:
            raise self._fail("timeout", reason) from None
        except TransportError as exc:
            raise self._fail(exc.kind, exc.reason) from None

    def _is_dropped(self, event: bytes) -> bool:
        """Learn from one event; True for the usage chunk the client did not ask for.
        Raises `UpstreamError` for an event whose data is neither JSON nor [DONE]."""
        try:
            data = event_data(event)
        except UnicodeDecodeError:
            raise self._fail("protocol", "sent an event that is not UTF-8") from None
        if data is None:
            return False  # a comment or keep-alive
        if data == DONE_DATA:
            self.facts.is_done = True
            return False
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise self._fail("protocol", "sent an event whose data is not a JSON object")
        is_usage_only = self.facts.observe_chunk(payload, time.perf_counter())
        return self._drop_usage and is_usage_only

    def _parse_body(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            if self._response.is_success:
                self.facts.observe_body(payload)
            return payload
        if self._response.is_success:
            raise self._fail("protocol", "answered with something other than a JSON object")
        return {
            "error": {
                "message": f"upstream {self._upstream.address} answered {self.status}",
                "type": _STATUS_TYPES.get(self.status, "invalid_request_error"),
                "param": None,
                "code": None,
            }
        }

    def _fail(self, kind: ErrorKind, reason: str) -> UpstreamError:
        return upstream_error(self._upstream, kind, reason, retryable=self.can_retry)
