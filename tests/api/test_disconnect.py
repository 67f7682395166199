"""`until_disconnected` / `unless_gone`: work in the caller's task, cancelled when the client
goes away, the cancellation withdrawn when it was theirs alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from starlette.requests import Request

from aicc.api.disconnect import ClientDisconnected, unless_gone, until_disconnected


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    def run() -> None:
        asyncio.run(test())

    run.__name__ = test.__name__
    return run


class Client:
    """An ASGI `receive` whose client leaves when told."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "headers": []}, self.receive)


@in_loop
async def test_work_that_ends_returns_its_result_in_the_same_task() -> None:
    client = Client()
    caller = asyncio.current_task()

    async def work() -> object:
        await asyncio.sleep(0.01)
        return asyncio.current_task()

    assert await until_disconnected(client.request(), work()) is caller
    client.gone.set()  # after the end: no effect
    await asyncio.sleep(0.01)
    assert caller is not None
    assert caller.cancelling() == 0


@in_loop
async def test_a_client_gone_cancels_the_work_and_raises_client_disconnected() -> None:
    client = Client()
    stopped = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            stopped.set()

    asyncio.get_running_loop().call_later(0.02, client.gone.set)
    with pytest.raises(ClientDisconnected):
        await until_disconnected(client.request(), work())
    assert stopped.is_set()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)  # no stray cancellation reaches the next await


@in_loop
async def test_a_cancellation_from_elsewhere_still_propagates() -> None:
    client = Client()

    async def caller() -> None:
        await until_disconnected(client.request(), asyncio.sleep(10))

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.01)
    client.gone.set()
    task.cancel()  # e.g. the server stopping, at the same moment
    with pytest.raises(asyncio.CancelledError):
        await task


@in_loop
async def test_work_that_finishes_despite_the_cancellation_keeps_its_result() -> None:
    client = Client()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "done anyway"
        return "never"

    asyncio.get_running_loop().call_later(0.02, client.gone.set)
    assert await until_disconnected(client.request(), stubborn()) == "done anyway"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    await asyncio.sleep(0.01)


@in_loop
async def test_unless_gone_returns_once_the_client_left() -> None:
    client = Client()
    sent: list[int] = []

    async def send_forever() -> None:
        while True:
            sent.append(1)
            await asyncio.sleep(0.005)

    asyncio.get_running_loop().call_later(0.03, client.gone.set)
    await asyncio.wait_for(unless_gone(client.receive, send_forever()), 2)
    assert sent
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


@in_loop
async def test_errors_of_the_work_pass_unchanged() -> None:
    client = Client()

    async def broken() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await until_disconnected(client.request(), broken())
    with pytest.raises(ValueError, match="bad"):
        await unless_gone(client.receive, broken())
