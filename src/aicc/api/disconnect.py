"""Work that stops when the client goes away.

The work runs in the caller's own task (no task of its own to start and to wake the caller
from); a small watcher task waits for the client's `http.disconnect` and cancels the caller,
the way `asyncio.timeout` does: the cancellation is withdrawn again when it was ours alone.
"""

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
    watch = _Watch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.close():
            raise ClientDisconnected from None
        raise
    finally:
        watch.close()


async def unless_gone(receive: Receive, work: Awaitable[None]) -> None:
    """Await `work` (sending a response) until it ends or the client goes away: then it is
    cancelled and this returns."""
    watch = _Watch(receive)
    try:
        await work
    except asyncio.CancelledError:
        if not watch.close():
            raise
    finally:
        watch.close()


class _Watch:
    """Cancels the current task once the client has gone away, until closed."""

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._is_open = True
        self._is_gone = False
        self._is_withdrawn = False
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        self._watcher.add_done_callback(self._on_watcher_done)

    def close(self) -> bool:
        """Stop watching (again: no effect). True when the client went away and the
        cancellation this caused was the only one the task had (it is withdrawn then)."""
        if self._is_open:
            self._is_open = False
            self._watcher.cancel()
            if self._is_gone:
                self._is_withdrawn = self._task.uncancel() == 0
        return self._is_withdrawn

    def _on_watcher_done(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or not self._is_open:
            return
        self._is_gone = True
        self._task.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
