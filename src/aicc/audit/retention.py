"""Retention: purging a prefix of the chain, and the daily task that does it.

A purge never leaves a hole: it deletes entries 1..S (or first..S) where S is the last entry
before the first one that is still young enough. Entry times are call start times, so a long
stream that started before the cut but committed after a younger call keeps that younger call
too; nothing is ever deleted out of chain order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, func, select

from aicc.audit.chain import format_time
from aicc.auth.principal import Principal
from aicc.config import Settings
from aicc.db.models import AuditEntryRow

if TYPE_CHECKING:
    from aicc.audit.writer import AuditLog

logger = logging.getLogger(__name__)

DAY_S = 86400.0
_LOG = cast(Table, AuditEntryRow.__table__)


def purge_plan(conn: Connection, cut: datetime, head_seq: int) -> tuple[int, int, str]:
    """(last seq to delete, how many entries that deletes, that entry's hash); count 0 and
    hash "" when nothing is older than `cut`."""
    first_kept = conn.execute(select(func.min(_LOG.c.seq)).where(_LOG.c.time >= cut)).scalar()
    through = head_seq if first_kept is None else first_kept - 1
    count = conn.execute(select(func.count()).where(_LOG.c.seq <= through)).scalar() or 0
    if count == 0:
        return through, 0, ""
    hash_through = conn.execute(select(_LOG.c.hash).where(_LOG.c.seq == through)).scalar_one()
    return through, count, hash_through


def purge_detail(
    actor: Principal | None, cut: datetime, count: int, through: int
) -> dict[str, Any]:
    """The `detail` of an `audit.purge` entry."""
    return {
        "actor": actor.username if actor is not None else "system (retention)",
        "cut": format_time(cut),
        "count": count,
        "through_seq": through if count else None,
    }


def retention_cut(settings: Settings, now: datetime) -> datetime:
    """Entries before this time are past `audit_retention_days`."""
    return now - timedelta(days=settings.audit_retention_days)


class RetentionTask:
    """Purges by retention at start and then every `interval_s` (a day) while the server runs.
    A failed purge is logged and retried at the next interval; it never stops the server."""

    def __init__(
        self,
        audit: AuditLog,
        settings: Settings,
        *,
        interval_s: float = DAY_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._audit = audit
        self._settings = settings
        self._interval_s = interval_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-retention")

    async def close(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            # Our own cancel() above; re-raise if the caller itself is being cancelled.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        self._task = None

    async def run_once(self) -> int:
        """Purge what retention allows now; the number of entries deleted.

        Raises AuditWriteError when the purge fails.
        """
        cut = retention_cut(self._settings, self._clock())
        return await self._audit.purge(cut, actor=None, record_empty=False)

    async def _run(self) -> None:
        while True:
            try:
                count = await self.run_once()
            except Exception:
                logger.exception(
                    "audit retention purge failed; retried in %.0f s", self._interval_s
                )
            else:
                if count:
                    logger.info("audit retention purged %d entries", count)
            await asyncio.sleep(self._interval_s)
