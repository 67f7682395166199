"""The HTTP edge below the ASGI app: a uvicorn protocol that cuts off slow and oversized
request headers (slowloris) before a request exists.

uvicorn times out idle kept-alive connections but not a request whose headers arrive slowly,
and httptools buffers a header of any size. `GuardedHttpProtocol` adds both bounds: a timer
runs from the moment the connection waits for a request (accepted, or the first byte after a
kept-alive pause) until its headers are complete, and the header section's size is counted.
Either bound exceeded → a JSON error (408 or 431, when no response is in progress) and the
connection is closed; no ASGI task is started, so no route, queue place or engine slot is
ever held. Beyond uvicorn's `limit_concurrency` (our `max_connections`) a request gets an
OpenAI-style 503 with `Retry-After` here, in place of uvicorn's plain-text one.
With TLS, the protocol runs over the decrypted stream once the handshake is done (the event
loop bounds the handshake itself: 60 s).

A response's head and its first body piece leave in one write when the app sends them in one
loop turn (uvicorn writes each message on its own): one segment, one wake-up of the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from aicc.api.errors import error_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    """Bounds on how a request's headers arrive."""

    timeout_s: float = 10.0
    """Longest from waiting for a request to its complete headers."""
    max_bytes: int = 32 * 1024
    """Largest header section (request line and headers)."""
    retry_after_s: int = 1
    """`Retry-After` of the 503 answered beyond the connection limit."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a header size limit.

    Use `guarded_protocol(limits)` for a class bound to other limits than the defaults.
    """

    limits: ClassVar[HeaderLimits] = HeaderLimits()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._num_raw_header_bytes = 0
        """Bytes received since the connection began waiting for the current headers."""
        self._num_header_bytes = 0
        """Request line and header bytes the parser has reported for the current request."""
        self._is_message_complete = True
        """The parser has read the current request whole (its body included)."""
        self._is_refused = False

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_waiting_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting_for_headers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._is_refused:
            return
        if self._header_timer is None and self._is_between_requests():
            # The next request on a kept-alive connection: uvicorn's keep-alive timer bounded
            # the pause before it, the header timer bounds the request from here.
            self._start_waiting_for_headers()
        waiting = self._header_timer
        super().data_received(data)
        if waiting is not None and waiting is self._header_timer and not self._is_refused:
            # Still waiting for the same headers. One header line that never ends is buffered
            # by the parser whole: bound the raw bytes too, not only what it has reported.
            # (A chunk in which one request ends and the next begins is not counted.)
            self._num_raw_header_bytes += len(data)
            if self._num_raw_header_bytes > self.limits.max_bytes:
                self._refuse_oversized_headers()

    # -- httptools parser callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._is_message_complete = False
        self._num_header_bytes = 0
        if self._header_timer is None:  # a pipelined request behind one in progress
            self._start_waiting_for_headers()

    def on_url(self, url: bytes) -> None:
        if not self._is_refused and self._count_header_bytes(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._is_refused and self._count_header_bytes(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._is_refused:
            return
        self._stop_waiting_for_headers()
        if self._is_over_capacity():
            logger.warning("%s: over the connection limit of %s; 503", self._peer(),
                           self.limit_concurrency)  # fmt: skip
            self._refuse(
                503,
                f"The server is at its limit of {self.limit_concurrency} connections; retry "
                f"after {self.limits.retry_after_s} s.",
                "server_overloaded",
                error_type="server_error",
                headers=[(b"retry-after", str(self.limits.retry_after_s).encode())],
            )
            return
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = _HeadWithFirstBody(self.transport, self.loop)

    def on_body(self, body: bytes) -> None:
        if not self._is_refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._is_message_complete = True
        if not self._is_refused:
            super().on_message_complete()

    # -- writes outside a response: after its held head, never before -------------------------
    def shutdown(self) -> None:
        self._write_held_head()
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        self._write_held_head()
        super().send_400_response(msg)

    def _write_held_head(self) -> None:
        """A head still held (a response whose body has no write, such as HEAD's) goes out
        before anything the protocol itself writes or closes in the same loop turn."""
        transport = self.cycle.transport if self.cycle is not None else None
        if isinstance(transport, _HeadWithFirstBody):
            transport.write_held_head()

    # -- the guards ----------------------------------------------------------------------------
    def _is_over_capacity(self) -> bool:
        """uvicorn's own test for its 503 (connections or request tasks at the limit)."""
        limit = self.limit_concurrency
        return limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)

    def _is_between_requests(self) -> bool:
        """The last request was read whole and answered: new bytes begin the next one. (After
        an early answer, such as a 413, the rest of that body is still read as body.)"""
        is_answered = self.cycle is None or self.cycle.response_complete
        return self._is_message_complete and is_answered

    def _start_waiting_for_headers(self) -> None:
        self._stop_waiting_for_headers()
        self._num_raw_header_bytes = 0
        self._header_timer = self.loop.call_later(self.limits.timeout_s, self._on_header_timeout)

    def _stop_waiting_for_headers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _count_header_bytes(self, num_bytes: int) -> bool:
        """Add to the header section's size; refuse the request (False) past the limit."""
        self._num_header_bytes += num_bytes
        if self._num_header_bytes <= self.limits.max_bytes:
            return True
        self._refuse_oversized_headers()
        return False

    def _refuse_oversized_headers(self) -> None:
        logger.info("%s: request headers over %d bytes; 431", self._peer(), self.limits.max_bytes)
        self._refuse(
            431,
            f"The request headers are larger than the limit of {self.limits.max_bytes} bytes.",
            "request_header_fields_too_large",
        )

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        timeout_s = self.limits.timeout_s
        logger.info("%s: request headers not complete within %g s; closed", self._peer(), timeout_s)
        message = f"The request headers were not complete within {timeout_s:g} s."
        self._refuse(408, message, "request_timeout")

    def _refuse(
        self,
        status: int,
        message: str,
        code: str,
        *,
        error_type: str = "invalid_request_error",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer `status` with OpenAI-style error JSON (unless a response is already being
        written on this connection) and close the connection."""
        self._is_refused = True
        self._stop_waiting_for_headers()
        self._write_held_head()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps(error_body(message, error_type, code=code)).encode()
            head = [STATUS_LINE[status]]
            extra = [*self.server_state.default_headers, *(headers or [])]
            head += [name + b": " + value + b"\r\n" for name, value in extra]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "client"


def guarded_protocol(limits: HeaderLimits) -> type[GuardedHttpProtocol]:
    """A `GuardedHttpProtocol` class bound to `limits`, for `uvicorn.Config(http=...)`
    (uvicorn builds one protocol object per connection from a class)."""
    bound_limits = limits

    class BoundGuardedHttpProtocol(GuardedHttpProtocol):
        limits = bound_limits

    return BoundGuardedHttpProtocol


class _HeadWithFirstBody(asyncio.Transport):
    """One response's view of its connection: the head (status line and headers, uvicorn's
    first write of a response) waits for the body's first write in the same loop turn, so
    both leave in one segment — one send and one wake-up of the client instead of two. A
    head with no body write in its turn goes out at the turn's end."""

    __slots__ = ("_head", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = b""
        """b"" until the head comes, then the head until it is written, then None."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is None:
            self._transport.write(data)
        elif head:
            self._head = None
            self._transport.write(head + data)
        elif bytes(data[:12]) == b"HTTP/1.1 100":  # 100 Continue: not the response's head
            self._transport.write(data)
        else:
            self._head = bytes(data)
            self._loop.call_soon(self.write_held_head)

    def write_held_head(self) -> None:
        """Write the head now if it is still held (and hold nothing from here on)."""
        head, self._head = self._head, None
        if head and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self.write_held_head()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._head or b"")
