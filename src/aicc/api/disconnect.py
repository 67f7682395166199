"""Work that stops when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its answer began: there is nobody to answer (the call is
    recorded 499, not as a server error)."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its generation or upstream call) if the
    client goes away first: then, once it has stopped, raise `ClientDisconnected`."""
    task, is_gone = await _race(request.receive, work)
    if not task.done():
        await asyncio.wait({task})  # its cancellation runs to the end; ours still propagates
    if is_gone and task.cancelled():
        raise ClientDisconnected
    return task.result()


async def unless_gone(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work` (sending a response) until it ends or the client goes away: then it is
    cancelled and this returns."""
    task, _ = await _race(receive, work)
    if not task.done():
        await asyncio.wait({task})  # its cancellation runs to the end; ours still propagates
    if not task.cancelled():
        task.result()


async def _race(receive: Receive, work: Awaitable[T]) -> tuple[asyncio.Future[T], bool]:
    """`work` run until it ends or the client goes away (then cancelled): its task, and
    whether the client went away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task, watcher.done() and not watcher.cancelled()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
