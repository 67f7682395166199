"""Credential → Principal, with a short cache so that a hot key costs no database round trip.

A cached answer lives at most `ttl_s` (≤ 2 s): a key revoked by another gateway stops working
within that time; revocations made through this process clear the cache at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from aicc.auth.principal import Principal

logger = logging.getLogger(__name__)

_MAX_ENTRIES = 10_000
_TOUCH_INTERVAL_S = 60.0
"""A key's `last_used_at` is written at most this often (one write per minute, not per call)."""


class PrincipalSource(Protocol):
    def resolve(self, token: str) -> Principal | None: ...

    def touch_key(self, key_id: str) -> None: ...


class CredentialResolver:
    """Resolves tokens off the event loop; answers (also "unknown") are cached by digest."""

    def __init__(
        self,
        source: PrincipalSource,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[Principal | None]] = {}
        self._touched: dict[str, float] = {}
        self._generation = 0

    async def resolve(self, token: str) -> Principal | None:
        # The digest, not the token, is the cache key: no plaintext credential is kept.
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.ttl_s:
            principal = cached[1]
        else:
            principal = await self._lookup(digest, token)
        if principal is not None and principal.key_id is not None:
            self._maybe_touch(principal.key_id, now)
        return principal

    def invalidate(self) -> None:
        """Forget every cached answer (after a revocation, a role change, a disabled user)."""
        self._cache.clear()
        self._generation += 1

    async def _lookup(self, digest: bytes, token: str) -> Principal | None:
        pending = self._pending.get(digest)
        if pending is not None:  # the same token is already being looked up: share it
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        generation = self._generation
        try:
            principal = await asyncio.to_thread(self.source.resolve, token)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._pending[digest]
        future.set_result(principal)
        if generation == self._generation:  # not invalidated while we looked
            self._cache[digest] = (self.clock(), principal)
            self._cache.move_to_end(digest)
            while len(self._cache) > _MAX_ENTRIES:
                self._cache.popitem(last=False)
        return principal

    def _maybe_touch(self, key_id: str, now: float) -> None:
        last = self._touched.get(key_id)
        if last is not None and now - last < _TOUCH_INTERVAL_S:
            return
        self._touched[key_id] = now
        if len(self._touched) > _MAX_ENTRIES:
            self._touched.clear()
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.source.touch_key, key_id)
        )
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("could not record a key's last use: %s", type(task.exception()).__name__)
