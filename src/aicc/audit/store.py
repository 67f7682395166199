"""The writer process's side of the audit log: one connection, the chain head, commits,
checkpoints and purges. Used by exactly one thread (`aicc.audit.worker`); not thread-safe.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import Connection, Table, delete, func, select

from aicc.audit.chain import GENESIS_HASH
from aicc.audit.checkpoints import Checkpoint, CheckpointFile, Reason
from aicc.audit.entries import AuditEntry, event_entry, recovered_entry
from aicc.audit.retention import purge_detail, purge_plan
from aicc.auth.principal import Principal
from aicc.db import Database
from aicc.db.models import AuditEntryRow, AuditOpenCall

logger = logging.getLogger(__name__)

_LOG = cast(Table, AuditEntryRow.__table__)
_LOG_COLUMNS = tuple(column.name for column in _LOG.columns)
_column_values = operator.attrgetter(*_LOG_COLUMNS)
"""An entry's values in column order (every column is an `AuditEntry` field)."""
_SEQ, _TIME, _ROLES, _DETAIL, _PREV_HASH, _HASH = (
    _LOG_COLUMNS.index(name) for name in ("seq", "time", "roles", "detail", "prev_hash", "hash")
)
_OPEN = cast(Table, AuditOpenCall.__table__)
_OPEN_COLUMNS = ("call_id", "opened_at", "request_id", "fields")


@dataclass(frozen=True, slots=True)
class OpenCall:
    """A streamed call to record in `audit_open` until its entry is appended."""

    call_id: str
    entry: AuditEntry


@dataclass(frozen=True, slots=True)
class Append:
    entry: AuditEntry
    open_call_id: str | None = None
    """The call's `audit_open` row, deleted in the same transaction."""


class ChainStore:
    def __init__(
        self,
        db: Database,
        checkpoints: CheckpointFile,
        checkpoint_every: int,
        *,
        fsync: bool = False,
    ) -> None:
        self._fsync = fsync
        self._db = db
        self.checkpoints = checkpoints
        self._checkpoint_every = checkpoint_every
        self._conn: Connection | None = None
        self.head_seq = 0
        self.head_hash = GENESIS_HASH
        self._first_seq = 1
        self._checkpoint_seq = 0
        """The newest checkpoint written (or found at start)."""

    @property
    def data_errors(self) -> tuple[type[Exception], ...]:
        """The driver's errors that one entry's data can cause (`commit` raises the driver's
        own errors, not SQLAlchemy's)."""
        dbapi = self._db.engine.dialect.loaded_dbapi
        return (dbapi.IntegrityError, dbapi.DataError)

    def prepare(self) -> int:
        """Load the head and record calls a stop left open; how many were recovered.

        Raises the database's error when the log cannot be read or written.
        """
        conn = self._connection()
        self._load_head(conn)
        latest = self.checkpoints.latest()
        self._checkpoint_seq = min(latest.seq, self.head_seq) if latest else 0
        if latest is not None and latest.seq > self.head_seq:
            logger.error("audit log ends before its latest checkpoint: run `aicc audit verify`")
        with conn.begin():
            rows = conn.execute(select(_OPEN).order_by(_OPEN.c.opened_at)).mappings().all()
            appends = [Append(recovered_entry(row["fields"]), row["call_id"]) for row in rows]
            head = self._write(_driver(conn), [], appends)
        self.head_seq, self.head_hash = head
        return len(rows)

    def commit(self, opens: list[OpenCall], appends: list[Append]) -> None:
        """One transaction: open rows in, entries chained in, their open rows out; then a
        periodic checkpoint when one is due.

        Raises the database's error (nothing is committed then; call `reset`).
        """
        # On the driver's own connection: SQLAlchemy's transaction and execution layers cost
        # more than SQLite's commit (this runs for every batch; nothing else shares `conn`).
        driver = _driver(self._connection())
        try:
            head = self._write(driver, opens, appends)
            driver.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                driver.rollback()
            raise
        self.head_seq, self.head_hash = head
        if self.head_seq - self._checkpoint_seq >= self._checkpoint_every:
            self.checkpoint("periodic")

    def purge(self, cut: datetime, actor: Principal | None, *, record_empty: bool) -> int:
        """Checkpoint the cut, delete the prefix before it and append `audit.purge`, in one
        transaction; the number of entries deleted.

        Raises the database's error, or OSError when the checkpoint cannot be written
        (nothing is deleted then).
        """
        conn = self._connection()
        with conn.begin():
            through, count, hash_through = purge_plan(conn, cut, self.head_seq)
            if count:
                # Before the delete: verification of what remains starts from it.
                self.checkpoint("purge", at=(through, hash_through))
                conn.execute(delete(_LOG).where(_LOG.c.seq <= through))
            detail = purge_detail(actor, cut, count, through)
            entry = event_entry(action="audit.purge", principal=actor, detail=detail)
            is_recorded = count > 0 or record_empty
            head = self._write(_driver(conn), [], [Append(entry)] if is_recorded else [])
        self.head_seq, self.head_hash = head
        if count:
            self._first_seq = through + 1
        return count

    def checkpoint(
        self, reason: Reason, *, at: tuple[int, str] | None = None, only_if_new: bool = False
    ) -> None:
        """Sign the head (or `at`) into the checkpoint file. A failed periodic or closing
        checkpoint is logged (the next commit retries); a failed purge checkpoint raises
        OSError."""
        seq, hash_ = at or (self.head_seq, self.head_hash)
        if seq == 0 or (only_if_new and seq == self._checkpoint_seq):
            return
        count = self.head_seq - self._first_seq + 1
        try:
            self.checkpoints.append(Checkpoint(seq, hash_, count, datetime.now(UTC), reason))
        except OSError:
            if reason == "purge":
                raise
            logger.exception("audit checkpoint not written (retried after the next commit)")
            return
        self._checkpoint_seq = max(self._checkpoint_seq, seq)

    def reset(self) -> None:
        """After a failure: a fresh connection, and the head as the database has it."""
        self.release()
        try:
            self._load_head(self._connection())
        except Exception:
            logger.exception("audit database unreachable; retried with the next entry")
            self.release()

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            if self._db.is_sqlite and self._fsync and not conn.invalidated:
                # The connection goes back to the shared pool: its default again.
                conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
        finally:
            conn.close()

    def _write(self, driver: Any, opens: list[OpenCall], appends: list[Append]) -> tuple[int, str]:
        """Insert in the transaction of `driver` (the driver's connection, not committed
        here), one multi-row statement per table: SQLAlchemy's per-row parameter processing
        cost more than the rest of a commit. The new head, to adopt once it commits."""
        seq, head = self.head_seq, self.head_hash
        values: list[object] = []
        for append in appends:
            seq += 1
            hash_, hashed_time = append.entry.link(seq, head)
            values.extend(self._row_values(append.entry, seq, head, hash_, hashed_time))
            head = hash_
        closed = [a.open_call_id for a in appends if a.open_call_id is not None]
        with contextlib.closing(driver.cursor()) as cursor:
            if opens:
                rows = [value for call in opens for value in self._open_values(call)]
                cursor.execute(self._insert_sql("audit_open", len(opens)), rows)
            if appends:
                cursor.execute(self._insert_sql("audit_log", len(appends)), values)
            if closed:
                marks = ", ".join([self._mark] * len(closed))
                cursor.execute(f"DELETE FROM audit_open WHERE call_id IN ({marks})", closed)
        return seq, head

    @functools.cached_property
    def _mark(self) -> str:
        """The driver's parameter mark."""
        return "?" if self._db.engine.dialect.paramstyle == "qmark" else "%s"

    @functools.lru_cache(maxsize=512)  # noqa: B019 (one store per process; batch sizes ≤ 256)
    def _insert_sql(self, table: Literal["audit_log", "audit_open"], num_rows: int) -> str:
        columns = _LOG_COLUMNS if table == "audit_log" else _OPEN_COLUMNS
        row = f"({', '.join([self._mark] * len(columns))})"
        rows = ", ".join([row] * num_rows)
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {rows}"

    def _open_values(self, call: OpenCall) -> tuple[object, ...]:
        """An `audit_open` row's values in `_OPEN_COLUMNS` order, as the driver takes them."""
        fields = call.entry.to_json()
        return (call.call_id, self._time_value(call.entry.time, fields["time"]),
                call.entry.request_id, json.dumps(fields))  # fmt: skip

    def _time_value(self, time: datetime, formatted: str) -> object:
        """A time as the driver takes it, from the time and its hashed text (`format_time`):
        SQLite keeps text in SQLAlchemy's DATETIME format, PostgreSQL a naive UTC timestamp."""
        if self._db.is_sqlite:
            return f"{formatted[:10]} {formatted[11:26]}"
        return time.astimezone(UTC).replace(tzinfo=None)

    def _row_values(
        self, entry: AuditEntry, seq: int, prev_hash: str, hash_: str, hashed_time: str
    ) -> list[object]:
        """The chained entry's column values as the driver takes them (as SQLAlchemy would
        store them: naive UTC times, JSON text)."""
        values: list[object] = list(_column_values(entry))
        values[_SEQ], values[_PREV_HASH], values[_HASH] = seq, prev_hash, hash_
        values[_TIME] = self._time_value(entry.time, hashed_time)
        values[_ROLES] = json.dumps(list(entry.roles)) if entry.roles else "[]"
        values[_DETAIL] = None if entry.detail is None else json.dumps(entry.detail)
        return values

    def _connection(self) -> Connection:
        if self._conn is None:
            conn = self._db.engine.connect()
            if self._db.is_sqlite and self._fsync:
                # FULL: an acknowledged entry survives a power loss, not only a process crash
                # (which WAL with the pool's NORMAL already survives), at a disk flush a batch.
                conn.exec_driver_sql("PRAGMA synchronous=FULL")
                conn.commit()
            self._conn = conn
        return self._conn

    def _load_head(self, conn: Connection) -> None:
        with conn.begin():
            last = conn.execute(
                select(_LOG.c.seq, _LOG.c.hash).order_by(_LOG.c.seq.desc()).limit(1)
            ).first()
            first = conn.execute(select(func.min(_LOG.c.seq))).scalar()
        self.head_seq, self.head_hash = (last[0], last[1]) if last else (0, GENESIS_HASH)
        self._first_seq = first or 1


def _driver(conn: Connection) -> Any:
    """The driver's own connection under `conn` (sqlite3's or psycopg's)."""
    driver = conn.connection.driver_connection
    assert driver is not None  # `conn` is open
    return driver
