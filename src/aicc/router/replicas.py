"""The router's replicas by id: built from settings, replaced and drained at run time, checked.

A replica keeps its object (client, outstanding count, health) while a change leaves its
settings as they are; one whose settings change gets a new client, and the old client drains.
A replica no deployment names any more leaves routing at once and drains. Used from the event
loop only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aicc.errors import ConfigError, InvalidRequestError
from aicc.router.build import Replica, build_replica, expand_ids, expanded
from aicc.router.drain import ClientDrain
from aicc.router.health import HealthTracker
from aicc.router.policy import DeploymentSpec, ReplicaLease, ReplicaSet
from aicc.router.remote import RemoteClient
from aicc.router.settings import DeploymentSettings, replica_id, replica_settings

logger = logging.getLogger(__name__)


class Replicas:
    """Replicas in routing (`by_id`), the engine workers among them, and drained clients."""

    def __init__(
        self, replicas: Iterable[Replica], health: HealthTracker, *, drain_timeout_s: float
    ) -> None:
        self.by_id = {replica.id: replica for replica in replicas}
        """Never rebound: the router hands this dict out as `Router.replicas`."""
        self.health = health
        self.supervised: set[str] = set()
        """Replicas whose state their supervisor reports (engine workers): no active checks."""
        self.workers: tuple[str, tuple[str, ...]] | None = None
        """With engine workers: (`local:<their model>`, the worker replica ids)."""
        self._drain = ClientDrain(drain_timeout_s, self._drained)

    def acquire(self, counts: ReplicaSet, replica: Replica) -> ReplicaLease:
        """Count one request on the replica (and on its client, which a drain waits for)."""
        if replica.client is None:
            return counts.acquire(replica.id)
        return self._drain.lease(counts, replica.id, replica.client)

    @property
    def num_draining(self) -> int:
        return self._drain.num_draining

    def routing(self, settings: DeploymentSettings) -> tuple[DeploymentSpec, tuple[str, ...]]:
        """The spec and fallback ids of `settings`, the workers' `local:` replica expanded."""
        spec = settings.spec()
        fallback = tuple(replica_id(settings.model, r) for r in settings.fallback)
        if self.workers is not None:
            local_id, ids = self.workers
            spec, fallback = expanded(spec, local_id, ids), expand_ids(fallback, local_id, ids)
        return spec, fallback

    def build(self, settings: DeploymentSettings, built: dict[str, Replica]) -> None:
        """Into `built`: the replicas `settings` needs that are not in routing as they are
        (`built` holds what was made so far when this raises). Raises `InvalidRequestError`
        (bad URL, missing key variable, unreadable key or CA file, an in-process model with
        engine workers)."""
        local_id = self.workers[0] if self.workers is not None else None
        for rid, replica in replica_settings(settings):
            if rid == local_id:
                continue  # stands for the engine workers
            if local_id is not None and replica.local is not None:
                raise InvalidRequestError(
                    f"replica {rid!r}: with engine workers the gateway loads no model "
                    f"in-process; name the workers' model ({local_id!r}) or use a url replica",
                    param="replicas",
                )
            current = self.by_id.get(rid)
            if current is not None and current.settings == replica:
                continue
            try:
                built[rid] = build_replica(rid, settings.model, replica)
            except (ConfigError, InvalidRequestError) as exc:
                raise InvalidRequestError(
                    f"replica {rid!r}: {exc.message}", param="replicas"
                ) from None

    def install(self, built: dict[str, Replica]) -> None:
        """Put `built` into routing; a replica it replaces drains."""
        for rid, replica in built.items():
            old = self.by_id.get(rid)
            self.by_id[rid] = replica
            if old is not None:
                self._drain.start(old)

    def drop_unused(self, used: set[str]) -> None:
        """Take the replicas not in `used` out of routing (engine workers stay); drain them."""
        for rid in [r for r in self.by_id if r not in used and r not in self.supervised]:
            replica = self.by_id.pop(rid)
            if replica.client is not None:
                self._drain.start(replica)
            else:
                self.health.forget(rid)

    async def watch(self, every_s: float) -> None:
        """Health checks every `every_s` seconds, until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            await self.check()

    async def check(self) -> None:
        """One round of active health checks over the remote replicas in routing now."""
        remote = [
            (replica.id, replica.client)
            for replica in self.by_id.values()
            if replica.client is not None and replica.id not in self.supervised
        ]
        results = await asyncio.gather(
            *(client.health() for _, client in remote), return_exceptions=True
        )
        for (rid, _), ok in zip(remote, results, strict=True):
            # A replica that left during the round is not judged (its client may be closed).
            if rid in self.by_id and self.health.record_check(rid, ok is True):
                logger.info("replica %s is back in service", rid)

    async def close(self) -> None:
        await self._drain.close()
        await close_clients(replica.client for replica in self.by_id.values())

    def _drained(self, rid: str) -> None:
        if rid not in self.by_id:
            self.health.forget(rid)


async def close_clients(clients: Iterable[RemoteClient | None]) -> None:
    for client in clients:
        if client is not None:
            await client.aclose()
