"""Loopback helpers for the deployment tests: scripted upstreams and a TCP relay that can be
stopped and restarted on the same port (a replica that goes down and comes back)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from contextlib import AsyncExitStack, suppress
from typing import Any, TypeVar

from tests.router.scripted import Respond, scripted_server

T = TypeVar("T")


class LoopThread:
    """An asyncio loop in a daemon thread, for servers the synchronous tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = AsyncExitStack()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout=30)

    def scripted(self, respond: Respond) -> str:
        """Start a scripted server; its URL."""

        async def start() -> str:
            scripted = await self.stack.enter_async_context(scripted_server(respond))
            return scripted.url

        return self.run(start())

    def close(self) -> None:
        self.run(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class Relay:
    """Forwards TCP connections from a loopback port to `target_port` until stopped."""

    def __init__(self, loop: LoopThread, target_port: int) -> None:
        self.loop = loop
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self.loop.run(self._start())

    def stop(self) -> None:
        self.loop.run(self._stop())

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def gated_stream(events: list[bytes], gate: threading.Event) -> Respond:
    """An SSE answer that sends its first event, waits for `gate` (set by the test's thread),
    then sends the rest and ends: a stream that stays open as long as a test needs."""

    async def respond(path: str, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        for index, event in enumerate(events):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            while index == 0 and not gate.is_set() and not stop.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # `gate` is set from another thread: polled
        writer.write(b"0\r\n\r\n")

    return respond
