"""The upstream HTTP/1.1 client on its own: framing, connection reuse, what it refuses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import pytest

from aicc.router.http1 import Http1Pool, Http1Response, TransportError

Answer = Callable[[bytes], Awaitable[bytes | None]]
"""(request head) → the bytes to answer; None closes the connection without answering."""


@dataclass
class Server:
    port: int
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def keep_alive_server(answer: Answer) -> AsyncIterator[Server]:
    """Answers every request on a connection until the client closes it."""
    server = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                server.heads.append(head)
                data = await answer(head)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
                if b"\r\nConnection: close\r\n" in data:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def sized(body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{line}\r\n" for line in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def pool_for(server: Server) -> Http1Pool:
    return Http1Pool("127.0.0.1", server.port, tls=None, connect_timeout_s=2)


async def read_all(response: Http1Response) -> bytes:
    parts = []
    try:
        while (chunk := await response.next_chunk()) is not None:
            parts.append(chunk)
    finally:
        await response.aclose()
    return b"".join(parts)


def test_a_read_answer_leaves_its_connection_for_the_next_request() -> None:
    async def go() -> None:
        async def answer(_head: bytes) -> bytes:
            return sized(b'{"ok": true}', "Content-Type: application/json")

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            for _ in range(3):
                response = await pool.request("POST", "/v1/x", {"a": "b"}, b"{}")
                assert (response.status_code, response.is_success) == (200, True)
                assert response.headers["content-type"] == "application/json"
                assert await read_all(response) == b'{"ok": true}'
            await pool.aclose()
            assert server.connections == 1
            head = server.heads[0].decode()
            assert head.startswith("POST /v1/x HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{server.port}\r\n" in head
            assert "a: b\r\n" in head

    asyncio.run(go())


def test_chunked_and_close_delimited_bodies() -> None:
    async def go() -> None:
        async def answer(head: bytes) -> bytes:
            if b"/chunked" in head:
                return (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                )
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            assert await read_all(await pool.request("GET", "/chunked", {})) == b"hello world"
            assert await read_all(await pool.request("GET", "/chunked", {})) == b"hello world"
            assert server.connections == 1
            response = await pool.request("GET", "/close", {})
            # The server closes after writing: the body ends with the connection.
            assert await asyncio.wait_for(read_all(response), 5) == b"until the end"
            await pool.aclose()

    asyncio.run(go())


def test_chunks_that_came_together_are_read_together() -> None:
    # A stream's last event and its usage chunk, sent in one write, reach the relay as one
    # read: the gateway starts its audit commit before the client has the last event.
    async def go() -> None:
        async def answer(_head: bytes) -> bytes:
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            )

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            response = await pool.request("GET", "/", {})
            assert await response.next_chunk() == b"abcde"
            assert await response.next_chunk() is None
            await response.aclose()
            await pool.aclose()

    asyncio.run(go())


def test_an_unfinished_answer_closes_its_connection() -> None:
    async def go() -> None:
        answers = 0

        async def answer(_head: bytes) -> bytes:
            nonlocal answers
            answers += 1
            if answers == 1:  # the head promises more than ever comes
                return b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789"
            return sized(b"whole")

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            response = await pool.request("GET", "/", {})
            assert await response.next_chunk() == b"0123456789"
            await response.aclose()  # most of the body unread: the connection cannot serve
            assert await read_all(await pool.request("GET", "/", {})) == b"whole"
            assert server.connections == 2
            await pool.aclose()

    asyncio.run(go())


def test_a_large_body_arrives_whole_under_flow_control() -> None:
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB, above the pause threshold

    async def go() -> None:
        async def answer(_head: bytes) -> bytes:
            return sized(body)

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            response = await pool.request("GET", "/", {})
            await asyncio.sleep(0.2)  # let the connection fill up and pause
            assert await read_all(response) == body
            await pool.aclose()

    asyncio.run(go())


def test_an_idle_connection_the_server_closed_is_replaced() -> None:
    async def go() -> None:
        answers = 0

        async def answer(_head: bytes) -> bytes | None:
            nonlocal answers
            answers += 1
            # The first connection answers once, then closes at its next request unanswered.
            return sized(b"ok") if answers != 2 else None

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            assert await read_all(await pool.request("GET", "/", {})) == b"ok"
            assert await read_all(await pool.request("GET", "/", {})) == b"ok"
            assert server.connections == 2
            await pool.aclose()

    asyncio.run(go())


def test_informational_answers_are_skipped() -> None:
    async def go() -> None:
        async def answer(_head: bytes) -> bytes:
            return b"HTTP/1.1 100 Continue\r\n\r\n" + sized(b"done")

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            response = await pool.request("POST", "/", {}, b"{}")
            assert response.status_code == 200
            assert await read_all(response) == b"done"
            await pool.aclose()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort", "closed"),
        (None, "closed"),
    ],
)
def test_broken_answers_are_transport_errors(reply: bytes | None, kind: str) -> None:
    async def go() -> TransportError:
        async def answer(_head: bytes) -> bytes | None:
            return reply

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            try:
                response = await pool.request("GET", "/", {})
                await read_all(response)
            except TransportError as exc:
                return exc
            finally:
                await pool.aclose()
        raise AssertionError("no error")

    assert asyncio.run(go()).kind == kind


def test_a_header_with_a_line_break_is_refused() -> None:
    async def go() -> None:
        pool = Http1Pool("127.0.0.1", 9, tls=None, connect_timeout_s=1)
        with pytest.raises(ValueError, match="line break"):
            await pool.request("GET", "/", {"x-id": "a\r\nInjected: yes"})
        await pool.aclose()

    asyncio.run(go())


def test_a_closed_pool_refuses_requests() -> None:
    async def go() -> None:
        pool = Http1Pool("127.0.0.1", 9, tls=None, connect_timeout_s=1)
        await pool.aclose()
        assert pool.is_closed
        with pytest.raises(TransportError) as caught:
            await pool.request("GET", "/", {})
        assert caught.value.kind == "connect"

    asyncio.run(go())


def test_a_read_that_waits_past_its_limit_times_out_and_drops_the_connection() -> None:
    async def go() -> None:
        async def answer(_head: bytes) -> bytes:
            # Chunked, one chunk, then silence (the body never ends).
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"

        async with keep_alive_server(answer) as server:
            pool = pool_for(server)
            response = await pool.request("POST", "/v1/x", {}, b"{}")
            assert await response.next_chunk(0.05) == b"abc"  # there already: no wait
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await response.next_chunk(0.2)
            assert 0.15 < loop.time() - started < 1.5
            await response.aclose()
            second = await pool.request("POST", "/v1/x", {}, b"{}")  # a new connection
            await second.aclose()
            await pool.aclose()
            assert server.connections == 2

    asyncio.run(go())
