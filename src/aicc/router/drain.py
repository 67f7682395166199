"""Remote replicas that left routing (a deployment replaced or removed), drained.

Requests already on such a replica finish normally; its client is closed once the last of them
has ended, or after `timeout_s`. Requests are counted per client, not per replica id: a replica
re-added under the same id with other settings gets a new client while the old one drains.
Used from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from aicc.router.policy import ReplicaLease, ReplicaSet
from aicc.router.remote import RemoteClient

if TYPE_CHECKING:
    from aicc.router.service import Replica

logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 0.5
"""A drained client stays open at least this long: a request that chose the replica just
before it left may not have taken its lease yet."""


class _ClientLease(ReplicaLease):
    """A replica lease that also counts the request on its client."""

    __slots__ = ("_on_release",)

    def __init__(self, replicas: ReplicaSet, replica_id: str, on_release: Callable[[], None]):
        super().__init__(replicas, replica_id)
        self._on_release = on_release

    def release(self) -> None:
        if self._is_released:
            return
        super().release()
        self._on_release()


class ClientDrain:
    """Counts requests per remote client and closes drained clients once idle."""

    def __init__(
        self,
        timeout_s: float,
        on_closed: Callable[[str], None],
        *,
        grace_s: float = DRAIN_GRACE_S,
    ) -> None:
        """`on_closed(replica_id)`: called when a drained client has been closed."""
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._on_closed = on_closed
        self._in_use: dict[RemoteClient, int] = {}
        self._idle: dict[RemoteClient, asyncio.Event] = {}
        self._tasks: dict[asyncio.Task[None], RemoteClient] = {}

    def lease(self, replicas: ReplicaSet, replica_id: str, client: RemoteClient) -> ReplicaLease:
        """Count one request on the replica (`replicas`) and on its client until released."""
        replicas.acquire(replica_id)  # counted; `_ClientLease` releases it
        self._in_use[client] = self._in_use.get(client, 0) + 1
        return _ClientLease(replicas, replica_id, lambda: self._released(client))

    def num_in_use(self, client: RemoteClient) -> int:
        return self._in_use.get(client, 0)

    @property
    def num_draining(self) -> int:
        return len(self._tasks)

    def start(self, replica: Replica) -> None:
        """Close `replica`'s client once its requests have ended (at most `timeout_s`)."""
        client = replica.client
        if client is None:
            return
        task = asyncio.create_task(self._drain(replica.id, client), name=f"drain {replica.id}")
        self._tasks[task] = client
        task.add_done_callback(lambda done: self._tasks.pop(done, None))

    async def close(self) -> None:
        """Stop draining: close every drained client now."""
        for task, client in list(self._tasks.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()
        self._tasks.clear()

    def _released(self, client: RemoteClient) -> None:
        count = self._in_use.get(client, 0) - 1
        if count > 0:
            self._in_use[client] = count
            return
        self._in_use.pop(client, None)
        idle = self._idle.get(client)
        if idle is not None:
            idle.set()

    async def _drain(self, replica_id: str, client: RemoteClient) -> None:
        idle = self._idle.setdefault(client, asyncio.Event())
        deadline = time.monotonic() + max(self.timeout_s, self.grace_s)
        await asyncio.sleep(self.grace_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_left(deadline)):
                while self.num_in_use(client) > 0:
                    idle.clear()
                    await idle.wait()
        left = self.num_in_use(client)
        self._idle.pop(client, None)
        await client.aclose()
        if left:
            logger.warning(
                "replica %s closed after the drain timeout with %d requests on it", replica_id, left
            )
        else:
            logger.info("replica %s drained and closed", replica_id)
        self._on_closed(replica_id)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
