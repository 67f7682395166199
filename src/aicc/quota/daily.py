"""Tokens per subject per UTC day, kept in memory and persisted in the `daily_usage` table.

The event loop reads and adds; the database is touched only when a subject's total is first
needed on a day (one indexed row) and by `flush()`, which writes the buffered increments as one
batch of additive upserts, so several aicc processes can share one database.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from aicc.db import Database
from aicc.db.models import DailyUsage

SECONDS_PER_DAY = 86_400

# (subject, "YYYY-MM-DD") -> tokens not yet written.
_Batch = dict[tuple[str, str], int]


def utc_day(timestamp: float) -> str:
    """The UTC date of a POSIX timestamp, as `daily_usage.day` stores it."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


class DailyUsageStore:
    """Today's token totals. `total`/`add` run on the event loop; `flush` in a worker thread."""

    def __init__(self, db: Database | None, wall_clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._wall_clock = wall_clock
        self._day = ""
        self._day_number = -1
        """`_day` as whole days since the epoch (the string is formatted once a day)."""
        # Loaded subjects only: the stored total plus everything added since (event loop only).
        self._totals: dict[str, int] = {}
        # Increments not yet written; handed over to `flush` under `_lock`.
        self._pending: _Batch = {}
        self._lock = threading.Lock()
        # Held for a whole write, and by a first load: a load must see each batch either in
        # the database or in `_pending`, never in both or neither.
        self._flush_lock = threading.Lock()

    @property
    def num_subjects(self) -> int:
        """Subjects whose total for today is held in memory."""
        return len(self._totals)

    @property
    def num_pending(self) -> int:
        """(subject, day) increments waiting for `flush()`."""
        with self._lock:
            return len(self._pending)

    def seconds_to_midnight(self) -> int:
        """Whole seconds (≥ 1) until the UTC day, and with it every daily quota, rolls over."""
        now = self._wall_clock()
        return max(1, math.ceil(SECONDS_PER_DAY - now % SECONDS_PER_DAY))

    def total(self, subject: str) -> int:
        """Tokens `subject` used today. The first call per subject and day reads the database
        on the calling thread (one row by unique index), after any flush in progress.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database could not be read.
        """
        day = self._roll()
        known = self._totals.get(subject)
        if known is None:
            known = self._totals[subject] = self._load(subject, day)
        return known

    def add(self, subject: str, num_tokens: int) -> None:
        """Count `num_tokens` for `subject` today (written by the next `flush()`)."""
        if num_tokens <= 0:
            return
        day = self._roll()
        if subject in self._totals:
            self._totals[subject] += num_tokens
        elif self._db is None:
            # Nothing to load later: memory is the only record.
            self._totals[subject] = num_tokens
        if self._db is not None:
            with self._lock:
                key = (subject, day)
                self._pending[key] = self._pending.get(key, 0) + num_tokens

    def flush(self) -> int:
        """Write the buffered increments (blocking; run it off the event loop). Returns the
        number of rows upserted. On failure the increments stay buffered for the next call.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the write failed.
        """
        if self._db is None:
            return 0
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                _upsert(self._db, batch)
            except BaseException:
                with self._lock:
                    for key, num_tokens in batch.items():
                        self._pending[key] = self._pending.get(key, 0) + num_tokens
                raise
            return len(batch)

    def _roll(self) -> str:
        now = self._wall_clock()
        day_number = int(now // SECONDS_PER_DAY)
        if day_number != self._day_number:
            # A new day: every quota starts from zero; old days' increments still get written.
            self._day_number = day_number
            self._day = utc_day(now)
            self._totals.clear()
        return self._day

    def _load(self, subject: str, day: str) -> int:
        if self._db is None:
            return 0
        with self._flush_lock:
            with self._db.session() as session:
                stored = session.scalar(
                    select(DailyUsage.num_tokens).where(
                        DailyUsage.subject == subject, DailyUsage.day == day
                    )
                )
            with self._lock:
                return (stored or 0) + self._pending.get((subject, day), 0)


def _upsert(db: Database, batch: _Batch) -> None:
    # Sorted rows: concurrent writers (several processes on PostgreSQL) lock rows in the same
    # order and cannot deadlock.
    rows = [
        {"subject": subject, "day": day, "num_tokens": num_tokens}
        for (subject, day), num_tokens in sorted(batch.items())
    ]
    statement = upsert_statement(db.engine.dialect.name)
    with db.session() as session:
        if statement is not None:
            session.connection().execute(statement, rows)
            return
        # Any other backend: update, else insert (not atomic across processes).
        for row in rows:
            result = session.execute(
                update(DailyUsage)
                .where(DailyUsage.subject == row["subject"], DailyUsage.day == row["day"])
                .values(num_tokens=DailyUsage.num_tokens + row["num_tokens"])
                .execution_options(synchronize_session=False)
            )
            if not getattr(result, "rowcount", 0):
                session.add(DailyUsage(**row))


def upsert_statement(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (subject, day) DO UPDATE SET num_tokens = num_tokens + new`` for
    SQLite and PostgreSQL; None for other backends."""
    if dialect not in ("sqlite", "postgresql"):
        return None
    insert: Any = sqlite.insert if dialect == "sqlite" else postgresql.insert
    statement = insert(DailyUsage)
    return statement.on_conflict_do_update(
        index_elements=[DailyUsage.subject, DailyUsage.day],
        set_={"num_tokens": DailyUsage.num_tokens + statement.excluded.num_tokens},
    )
