"""A lean HTTP/1.1 client for the gateway's upstreams: kept-alive connections, C parsing.

A proxied call's own cost is mostly its client: a general one (redirects, auth flows, cookies,
decoders, an async abstraction layer) spent more of the gateway's event loop than routing and
auditing together. This one does only what the proxy needs: one request per connection at a
time, answers parsed by `httptools` (llhttp, the parser uvicorn serves with), bodies handed on
as they arrive with flow control, idle connections kept for the next call.

Errors are `TransportError` with a kind the caller can judge: `connect` (nothing was sent),
`timeout` (connecting took too long), `closed` (the connection ended before the answer did),
`protocol` (not HTTP).
Deadlines are the caller's (`asyncio.timeout` around any await, or `next_chunk`'s own limit);
connecting has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Literal, cast

import httptools

__all__ = ["Http1Pool", "Http1Response", "TransportError"]

TransportKind = Literal["connect", "timeout", "closed", "protocol"]

_HIGH_WATER = 1 << 20
"""Unread answer bytes at which the connection stops reading (resumed as they are read)."""
_MAX_IDLE = 64
_MAX_LEFTOVER = 64 * 1024
"""Unread body `finish` reads to keep a connection; beyond it the connection is closed."""


class TransportError(Exception):
    def __init__(self, kind: TransportKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.is_closed = False
        self._parser: httptools.HttpResponseParser | None = None
        self._exchange: _Exchange | None = None
        self._is_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        exchange, parser = self._exchange, self._parser
        if exchange is None or parser is None:
            self.close()  # bytes nobody asked for: the connection is not reusable
            return
        exchange.received_any = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            exchange.fail(TransportError("protocol", "switched protocols"))
            self.close()
        except httptools.HttpParserError:
            exchange.fail(TransportError("protocol", "did not answer in HTTP"))
            self.close()
            return
        if exchange.buffered >= _HIGH_WATER and not self._is_paused and self.transport:
            self._is_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close the transport; `connection_lost` settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        exchange = self._exchange
        if exchange is not None:
            exchange.end_of_connection(exc)

    # -- use -----------------------------------------------------------------------------
    def start(self, request: bytes) -> _Exchange:
        assert self.transport is not None
        exchange = self._exchange = _Exchange(self)
        self._parser = httptools.HttpResponseParser(exchange)
        if self.is_closed or self.transport.is_closing():
            exchange.end_of_connection(None)
        else:
            self.transport.write(request)
        return exchange

    def resume(self) -> None:
        if self._is_paused and self.transport is not None and not self.is_closed:
            self._is_paused = False
            self.transport.resume_reading()

    def finish(self) -> None:
        self._exchange = None
        self._parser = None

    def close(self) -> None:
        """Close now: the socket is shut at once (not on the loop's next turn), so an
        upstream generating an answer nobody reads hears of it without delay."""
        self.is_closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Transports hand out a wrapper without shutdown(); a duplicate descriptor
            # reaches the same connection.
            with (
                contextlib.suppress(OSError, ValueError),
                socket.socket(fileno=os.dup(sock.fileno())) as raw,
            ):
                raw.shutdown(socket.SHUT_RDWR)
        transport.abort()


class _Exchange:
    """The answer to one request, filled by parser callbacks on the event loop."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.received_any = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.buffered = 0
        self.is_complete = False
        self.error: TransportError | None = None
        self._has_length = False
        self._chunks: deque[bytes] = deque()
        self._headers_done = asyncio.get_running_loop().create_future()
        self._wakeup: asyncio.Future[None] | None = None

    # -- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        if key in ("content-length", "transfer-encoding"):
            self._has_length = True

    def on_headers_complete(self) -> None:
        parser = self.connection._parser
        assert parser is not None
        self.status = parser.get_status_code()
        if self.status < 200:  # 1xx: another head follows
            self.headers = {}
            return
        if not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.is_complete = True
        self._wake()

    # -- events from the connection ----------------------------------------------------------
    def fail(self, error: TransportError) -> None:
        if self.error is None and not self.is_complete:
            self.error = error
        if not self._headers_done.done():
            self._headers_done.set_exception(error)
            self._headers_done.exception()  # retrieved: no "never retrieved" warning
        self._wake()

    def end_of_connection(self, exc: Exception | None) -> None:
        if self.is_complete:
            return
        if self._headers_done.done() and not self._has_length and exc is None:
            self.is_complete = True  # an answer without a length ends with its connection
            self._wake()
            return
        if isinstance(exc, ssl.SSLError):
            self.fail(TransportError("closed", f"TLS failed ({exc.reason or exc})"))
        else:
            reason = "closed the connection before the answer was complete"
            self.fail(TransportError("closed", reason))

    @property
    def is_reusable(self) -> bool:
        """The answer was read to its end and its connection may carry the next request."""
        keep_alive = self.headers.get("connection", "").lower() != "close"
        return self.is_complete and not self._chunks and self._has_length and keep_alive

    # -- reading -------------------------------------------------------------------------
    async def headers_done(self) -> None:
        await self._headers_done

    async def next_chunk(self, wait_s: float | None = None) -> bytes | None:
        """The body's bytes that have come and were not yet read, together (the chunks of
        one upstream read, e.g. a stream's last event and its usage, are relayed together);
        None at its end. Raises TransportError, and TimeoutError when nothing came within
        `wait_s` (no limit: None)."""
        deadline: float | None = None
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                self.connection.resume()
                return data
            if self.is_complete:
                return None
            if self.error is not None:
                raise self.error
            loop = asyncio.get_running_loop()
            wakeup = self._wakeup = loop.create_future()
            timer = None
            if wait_s is not None:  # a plain timer, not `asyncio.timeout`: streams wait a lot
                if deadline is None:
                    deadline = loop.time() + wait_s
                timer = loop.call_at(deadline, _expire, wakeup)
            try:
                await wakeup
            finally:
                self._wakeup = None
                if timer is not None:
                    timer.cancel()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


def _expire(wakeup: asyncio.Future[None]) -> None:
    if not wakeup.done():
        wakeup.set_exception(TimeoutError())


class Http1Response:
    """An answer whose head has arrived. Read its body with `next_chunk()` or `read()`;
    `aclose()` always (its connection goes back to the pool only when the body was read
    to its end)."""

    def __init__(self, pool: Http1Pool, connection: _Connection, exchange: _Exchange) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._exchange = exchange
        self.status_code = exchange.status
        self.headers = exchange.headers
        """Lower-case names; repeated headers joined with ', '."""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    async def next_chunk(self, wait_s: float | None = None) -> bytes | None:
        """The body's bytes that have come since the last call (all of them); None at its
        end. Raises TransportError, and TimeoutError when nothing came within `wait_s` (the
        connection is closed then)."""
        try:
            return await self._exchange.next_chunk(wait_s)
        except BaseException:
            self._discard()
            raise

    async def finish(self, wait_s: float) -> None:
        """Read what is left of the body (a little, for a short while) and drop it, so that
        the connection can be reused; never raises but CancelledError."""
        size = 0
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(wait_s):
                while (chunk := await self.next_chunk()) is not None:
                    size += len(chunk)
                    if size > _MAX_LEFTOVER:
                        self._discard()
                        return

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.finish()
        if self._exchange.is_reusable and not connection.is_closed:
            self._pool.release(connection)
        else:
            connection.close()

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish()
            connection.close()


class Http1Pool:
    """Connections to one origin (scheme, host, port), kept alive between requests."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout_s: float,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        default_port = 443 if tls is not None else 80
        bracketed = f"[{host}]" if ":" in host else host
        authority = bracketed if port == default_port else f"{bracketed}:{port}"
        self._host_line = f"Host: {authority}\r\n".encode("latin-1")
        self._idle: list[_Connection] = []
        self._is_closed = False

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Http1Response:
        """Send a request; return once the answer's head has arrived.

        Raises TransportError, and ValueError for a header that would split the request.
        """
        request = self._encode(method, target, headers, body)
        while True:
            connection, is_reused = await self._connection()
            try:
                exchange = connection.start(request)
                await exchange.headers_done()
            except TransportError as exc:
                connection.finish()
                connection.close()
                if is_reused and not exchange.received_any and exc.kind == "closed":
                    continue  # the server closed it while idle; a fresh one is tried
                raise
            except BaseException:
                connection.finish()
                connection.close()
                raise
            return Http1Response(self, connection, exchange)

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def release(self, connection: _Connection) -> None:
        if self._is_closed or len(self._idle) >= _MAX_IDLE:
            connection.close()
        else:
            self._idle.append(connection)

    async def aclose(self) -> None:
        self._is_closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_closed:
                return connection, True
        if self._is_closed:
            raise TransportError("connect", "could not be reached (the client is closed)")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except TimeoutError:
            limit = self._connect_timeout_s
            raise TransportError("timeout", f"could not be reached within {limit:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise TransportError("connect", f"could not be reached ({exc})") from None
        return connection, False

    def _encode(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._host_line]
        for name, value in headers.items():
            line = f"{name}: {value}\r\n"
            if "\r" in line[:-2] or "\n" in line[:-2]:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(line.encode())
        if body or method == "POST":
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines)
