"""A response's head waits for its first body piece of the same loop turn: one write."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from aicc.edge import GuardedHttpProtocol, _HeadWithFirstBody


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.is_closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.is_closed = True

    def is_closing(self) -> bool:
        return self.is_closed

    def get_write_buffer_size(self) -> int:
        return 0


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n"


def test_head_and_first_body_of_one_turn_leave_together() -> None:
    async def go() -> None:
        transport = RecordingTransport()
        view = _HeadWithFirstBody(transport, asyncio.get_running_loop())
        view.write(HEAD)
        assert transport.writes == []
        assert view.get_write_buffer_size() == len(HEAD)
        view.write(b"5\r\nhello\r\n")
        view.write(b"0\r\n\r\n")
        await asyncio.sleep(0)
        assert transport.writes == [HEAD + b"5\r\nhello\r\n", b"0\r\n\r\n"]

    asyncio.run(go())


def test_a_head_alone_goes_out_at_the_end_of_its_turn() -> None:
    async def go() -> None:
        transport = RecordingTransport()
        view = _HeadWithFirstBody(transport, asyncio.get_running_loop())
        view.write(HEAD)
        await asyncio.sleep(0)
        assert transport.writes == [HEAD]
        view.write(b"later")
        assert transport.writes == [HEAD, b"later"]

    asyncio.run(go())


def test_100_continue_is_not_held_and_close_writes_a_held_head_first() -> None:
    async def go() -> None:
        transport = RecordingTransport()
        view = _HeadWithFirstBody(transport, asyncio.get_running_loop())
        view.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        view.write(HEAD)
        view.close()
        assert transport.writes[1:] == [HEAD]
        assert transport.is_closed
        await asyncio.sleep(0)
        assert len(transport.writes) == 2  # the turn's end writes nothing again

    asyncio.run(go())


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})


@pytest.fixture
def port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = int(probe.getsockname()[1])
    config = uvicorn.Config(
        _app, host="127.0.0.1", port=free, http=GuardedHttpProtocol, log_level="warning",
        lifespan="off",
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield free
    server.should_exit = True
    thread.join(10)


def test_a_stream_starts_with_its_head_and_first_event_in_one_segment(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        first = sock.recv(65536)  # what arrived before the app's pause
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        assert first.endswith(b"data: 1\n\n\r\n")
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
        assert b"data: 2\n\n" in rest


def test_a_head_request_gets_its_head_at_the_end_of_the_turn(port: int) -> None:
    # HEAD: the response has no body write, so its head goes out when its turn ends.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")


def test_shutdown_writes_a_held_head_before_closing() -> None:
    async def go() -> None:
        transport = RecordingTransport()
        view = _HeadWithFirstBody(transport, asyncio.get_running_loop())
        view.write(HEAD)
        protocol = SimpleNamespace(cycle=SimpleNamespace(transport=view))
        GuardedHttpProtocol._write_held_head(protocol)  # type: ignore[arg-type]
        assert transport.writes == [HEAD]
        view.write(b"x")
        assert transport.writes == [HEAD, b"x"]

    asyncio.run(go())
