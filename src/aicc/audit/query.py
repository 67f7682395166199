"""Reading the audit log: filtered pages by seq (the admin API, the CLI) and full exports.

Both read oldest first (ascending seq); a page's last seq is the next page's `after_seq`, which
stays correct while the writer appends and while retention purges the oldest entries.
Synchronous: async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, select

from aicc.audit.entries import AuditEntry
from aicc.db import Database
from aicc.db.models import AuditEntryRow

_LOG = cast(Table, AuditEntryRow.__table__)


def query(
    db: Database,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    username: str | None = None,
    model: str | None = None,
    status: int | None = None,
    action: str | None = None,
    after_seq: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Up to `limit` entries with seq > `after_seq`, oldest first, that match every filter
    given: time in [since, until), exact username, model, status and action.

    Raises ValueError for a limit below 1 or naive datetimes; the database's error otherwise.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    statement = _filtered(since, until, username, model, status, action, after_seq).limit(limit)
    with db.engine.connect() as conn:
        return [AuditEntry.from_row(row) for row in conn.execute(statement).mappings()]


def _filtered(
    since: datetime | None,
    until: datetime | None,
    username: str | None,
    model: str | None,
    status: int | None,
    action: str | None,
    after_seq: int | None,
) -> Select[Any]:
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise ValueError("audit time filters must be aware datetimes")
    statement = select(_LOG).order_by(_LOG.c.seq)
    if since is not None:
        statement = statement.where(_LOG.c.time >= since)
    if until is not None:
        statement = statement.where(_LOG.c.time < until)
    if after_seq is not None:
        statement = statement.where(_LOG.c.seq > after_seq)
    equal = {"username": username, "model": model, "status": status, "action": action}
    for name, value in equal.items():
        if value is not None:
            statement = statement.where(_LOG.c[name] == value)
    return statement
