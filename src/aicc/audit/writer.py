"""The audit log's front: async calls on the event loop, one writer thread behind a queue.

The event loop only builds an entry and queues it with a future. The writer thread takes
whatever is queued (up to `MAX_BATCH`), numbers and chains it, commits once, then resolves every
future of the batch with one `call_soon_threadsafe`: while one commit waits on the disk the next
batch gathers, so an fsync is shared by every call that arrived meanwhile (group commit).
One writer per audit database: seq numbers come from this thread's memory.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.exc import DataError, IntegrityError

from aicc.api.record import CallOutcome, CallRecord
from aicc.audit.checkpoints import CHECKPOINTS_FILE_NAME, CheckpointFile
from aicc.audit.entries import AuditEntry, entry_from_call, event_entry, load_content_cipher
from aicc.audit.store import Append, ChainStore, OpenCall
from aicc.auth.principal import Principal
from aicc.config import Settings
from aicc.db import Database
from aicc.errors import AiccError

logger = logging.getLogger(__name__)

MAX_BATCH = 256
"""Entries (and open rows) committed together at most."""
_DATA_ERRORS = (IntegrityError, DataError, TypeError, ValueError)
"""Errors one entry's data can cause: the batch is then retried entry by entry."""


class AuditWriteError(AiccError):
    """An audit entry could not be committed: the call must not be reported as done."""

    status_code = 503
    code = "audit_unavailable"


@dataclass(slots=True)
class _Work:
    kind: Literal["append", "open", "purge", "stop"]
    future: asyncio.Future[Any]
    entry: AuditEntry | None = None
    call_id: str | None = None
    """open: the `audit_open` row to insert; append: the row to delete with it."""
    cut: datetime | None = None
    actor: Principal | None = None
    record_empty: bool = True


class AuditLog:
    """The hash-chained audit log (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        secret: bytes,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        """`on_commit(seconds, num_records)` runs in the writer thread after each commit.

        Raises ConfigError when content capture is on without a valid key.
        """
        self.db = db
        self._cipher = load_content_cipher(settings)
        checkpoints = CheckpointFile(settings.state_dir / CHECKPOINTS_FILE_NAME, secret)
        self._store = ChainStore(
            db, checkpoints, settings.audit_checkpoint_every, fsync=settings.audit_fsync
        )
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._pending: list[_Work] = []
        """Work submitted during this turn of the event loop, handed over at its end: one
        wake-up of the writer thread per turn, not one per call."""
        self._thread: threading.Thread | None = None
        self._is_closed = False
        self._open_calls: dict[int, str] = {}
        """id(CallRecord) -> its `audit_open` row, from `open_call` to `append`."""

    @property
    def checkpoints_path(self) -> Any:
        return self._store.checkpoints.path

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest committed entry."""
        return self._store.head_seq, self._store.head_hash

    async def start(self) -> None:
        """Start the writer thread; calls a stop left open are recorded first.

        Raises the database's error when the log cannot be read or recovered.
        """
        if self._thread is not None:
            raise RuntimeError("the audit log is already started")
        ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(
            target=self._run, args=(_Work("stop", ready),), name="aicc-audit", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self) -> None:
        """Commit everything queued, write a `close` checkpoint, stop the thread."""
        if self._thread is None or self._is_closed:
            return
        self._is_closed = True
        if self._thread.is_alive():
            await self._submit(_Work("stop", self._new_future()), check_open=False)
        await asyncio.to_thread(self._thread.join)

    async def open_call(self, record: CallRecord, outcome: CallOutcome) -> None:
        """Commit an `audit_open` row for a stream (before its headers go out): should the
        server stop before `append`, the next start records the call as `audit.recovered`.

        Raises AuditWriteError when it cannot be committed.
        """
        call_id = uuid.uuid4().hex
        entry = entry_from_call(record, outcome)
        await self._submit(_Work("open", self._new_future(), entry=entry, call_id=call_id))
        self._open_calls[id(record)] = call_id

    async def append(self, record: CallRecord, outcome: CallOutcome) -> None:
        """Return once the call's chained entry is committed (and its open row deleted).

        Raises AuditWriteError when it cannot be committed.
        """
        entry = entry_from_call(record, outcome, cipher=self._cipher)
        call_id = self._open_calls.pop(id(record), None)
        await self._submit(_Work("append", self._new_future(), entry=entry, call_id=call_id))

    async def append_event(
        self,
        *,
        action: str,
        principal: Principal | None,
        detail: dict[str, Any],
        status: int = 200,
    ) -> None:
        """Record what is not an HTTP call. Raises AuditWriteError like `append`."""
        entry = event_entry(action=action, principal=principal, detail=detail, status=status)
        await self._submit(_Work("append", self._new_future(), entry=entry))

    async def purge(
        self, before: datetime, *, actor: Principal | None, record_empty: bool = True
    ) -> int:
        """Delete entries older than `before` (the chain's prefix up to the first younger
        entry), checkpointing the cut first, and append an `audit.purge` entry naming actor,
        cut and count; the number deleted. `record_empty=False` (the daily task) appends no
        entry when nothing was deleted.

        Raises ValueError for a naive `before`; AuditWriteError when the purge fails (nothing
        is deleted then).
        """
        if before.tzinfo is None:
            raise ValueError("the purge cut must be an aware datetime")
        work = _Work("purge", self._new_future(), cut=before, actor=actor)
        work.record_empty = record_empty
        count: int = await self._submit(work)
        return count

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, work: _Work, *, check_open: bool = True) -> Any:
        if self._thread is None or (check_open and self._is_closed):
            raise AuditWriteError("the audit log is not running")
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._pending.append(work)
        return await work.future

    def _hand_over(self) -> None:
        pending, self._pending = self._pending, []
        for work in pending:
            self._queue.put(work)

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self, ready: _Work) -> None:
        try:
            num_recovered = self._store.prepare()
        except Exception as exc:
            logger.exception("the audit log cannot start")
            self._store.release()
            _settle([ready], exc)
            return
        if num_recovered:
            logger.warning("audit: %d call(s) left open by a stop recorded", num_recovered)
        _settle([ready])
        carried: _Work | None = None
        while True:
            work = carried or self._queue.get()
            carried = None
            if work.kind == "stop":
                self._store.checkpoint("close", only_if_new=True)
                self._store.release()
                _settle([work])
                break
            if work.kind == "purge":
                self._purge(work)
                continue
            batch = [work]
            while len(batch) < MAX_BATCH:
                try:
                    queued = self._queue.get_nowait()
                except queue.Empty:
                    break
                if queued.kind in ("purge", "stop"):
                    carried = queued
                    break
                batch.append(queued)
            self._commit(batch)
        self._fail_leftovers()

    def _commit(self, batch: list[_Work]) -> None:
        started = time.perf_counter()
        opens: list[OpenCall] = []
        appends: list[Append] = []
        for work in batch:
            if work.entry is None:
                continue
            if work.kind == "open" and work.call_id is not None:
                opens.append(OpenCall(work.call_id, work.entry))
            elif work.kind == "append":
                appends.append(Append(work.entry, work.call_id))
        try:
            self._store.commit(opens, appends)
        except _DATA_ERRORS as exc:
            self._store.reset()
            if len(batch) > 1:
                for work in batch:  # one bad entry must not fail its neighbours
                    self._commit([work])
                return
            logger.exception("an audit entry was refused by the database")
            _settle(batch, _write_error(exc))
            return
        except Exception as exc:
            logger.exception("audit commit failed")
            self._store.reset()
            _settle(batch, _write_error(exc))
            return
        _settle(batch)
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started, len(batch))

    def _purge(self, work: _Work) -> None:
        assert work.cut is not None  # set by `purge`
        try:
            count = self._store.purge(work.cut, work.actor, record_empty=work.record_empty)
        except Exception as exc:
            logger.exception("audit purge failed")
            self._store.reset()
            _settle([work], _write_error(exc))
            return
        _settle([work], count)

    def _fail_leftovers(self) -> None:
        leftovers = []
        while True:
            try:
                leftovers.append(self._queue.get_nowait())
            except queue.Empty:
                break
        _settle(leftovers, AuditWriteError("the audit log is closed"))


def _settle(works: list[_Work], result: Any = None) -> None:
    """Resolve futures on their own loops: one wake-up per loop and batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[Any]]] = {}
    for work in works:
        by_loop.setdefault(work.future.get_loop(), []).append(work.future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures, result)
        except RuntimeError:
            logger.debug("audit: a caller's event loop closed before its entry committed")


def _resolve(futures: list[asyncio.Future[Any]], result: Any) -> None:
    for future in futures:
        if future.done():  # the caller was cancelled; the entry is committed regardless
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _write_error(cause: BaseException) -> AuditWriteError:
    error = AuditWriteError("the audit log could not record this call")
    error.__cause__ = cause
    return error
