"""Small HTTP servers on loopback that answer in scripted, often broken, ways."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

Respond = Callable[[str, asyncio.StreamWriter, asyncio.Event], Awaitable[None]]
"""(request path, writer, stop event) → writes the answer, or not."""


@dataclass
class Scripted:
    url: str
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    """(headers with lower-case names, body) of each request received."""

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index][1])


@asynccontextmanager
async def scripted_server(
    respond: Respond, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Scripted]:
    """A server that reads each request, then lets `respond` write (or not) what it likes.
    `respond` gets an event that is set when the server stops, to wait on instead of hanging."""
    stop = asyncio.Event()
    scripted = Scripted("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode().split("\r\n")
            path = request_line.split(" ")[1]
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, _, value in (line.partition(":") for line in lines if line)
            )
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            scripted.requests.append((headers, body))
            await respond(path, writer, stop)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away first
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scripted.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield scripted
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let handlers see `stop` and close their sockets


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def answer(status: str, content_type: str, body: bytes) -> Respond:
    async def respond(path: str, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )

    return respond


def sse_events(*payloads: dict[str, Any] | str) -> list[bytes]:
    return [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads]


def stream(events: list[bytes], *, then: str = "finish", chunked: bool = True) -> Respond:
    """An SSE answer of `events`; `then`: "finish" (end the body), "close" (drop the
    connection mid-body) or "hang" (keep it open, silent)."""

    async def respond(path: str, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
        framing = "Transfer-Encoding: chunked" if chunked else "Connection: close"
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{framing}\r\n\r\n".encode()
        )
        for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
            await writer.drain()
            await asyncio.sleep(0.01)
        if then == "hang":
            await stop.wait()
        elif then == "finish" and chunked:
            writer.write(b"0\r\n\r\n")

    return respond


async def hang(path: str, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    """Accept the request and never answer."""
    await stop.wait()


def routes(by_path: dict[str, Respond], default: Respond) -> Respond:
    async def respond(path: str, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
        await by_path.get(path, default)(path, writer, stop)

    return respond
