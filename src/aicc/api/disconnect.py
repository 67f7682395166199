"""Work that stops when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

T = TypeVar("T")


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its generation or upstream call) if the
    client goes away first (then this raises CancelledError)."""
    task = await _race(request.receive, work)
    return await task


async def unless_gone(receive: Receive, work: Awaitable[None]) -> None:
    """Run `work` (sending a response) until it ends or the client goes away: then it is
    cancelled and this returns."""
    task = await _race(receive, work)
    if not task.done():
        await asyncio.wait({task})  # its cancellation runs to the end; ours still propagates
    if not task.cancelled():
        task.result()


async def _race(receive: Receive, work: Awaitable[T]) -> asyncio.Future[T]:
    """`work` run until it ends or the client goes away (then cancelled): its task."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
