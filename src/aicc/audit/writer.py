"""The audit log's front: async calls on the event loop, one writer process behind a socket.

The event loop only builds an entry and queues it with a future; what is queued during one
turn of the loop goes to the writer process (`aicc.audit.worker`) as one frame at its end, and
a call's entry (which its client waits for) at once, with whatever was queued before it. The
worker numbers and chains what it has received, commits once, and acknowledges the batch; the
acknowledgement resolves the futures in the socket protocol's callback that reads it. While
one commit waits on the disk the next batch gathers, so a commit is shared by every call that
arrived meanwhile (group commit). Hashing and database work run on another core, outside this
process's GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from aicc.api.record import CallOutcome, CallRecord
from aicc.audit.checkpoints import CHECKPOINTS_FILE_NAME
from aicc.audit.entries import call_values, event_entry, load_content_cipher
from aicc.audit.worker import Done, Item, Kind, Ready, WorkerConfig, decode_frames, encode_frame
from aicc.auth.principal import Principal
from aicc.config import Settings
from aicc.db import Database
from aicc.errors import AiccError

logger = logging.getLogger(__name__)

# A fresh interpreter (fork + exec, never a bare fork: the gateway runs threads whose locks a
# forked copy could inherit held; and not multiprocessing's spawn or forkserver, which re-run
# the gateway's __main__ in the child).
_WORKER_MAIN = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from aicc.audit.worker import serve_fd; serve_fd(int(sys.argv[1]))"
)
START_TIMEOUT_S = 120.0
"""Longest the writer process may take to start and recover open calls."""
STOP_TIMEOUT_S = 30.0


class AuditWriteError(AiccError):
    """An audit entry could not be committed: the call must not be reported as done."""

    status_code = 503
    code = "audit_unavailable"


class AuditLog:
    """The hash-chained audit log (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        secret: bytes,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        """`on_commit(seconds, num_records)` runs on the event loop after each commit.

        Raises ConfigError when content capture is on without a valid key.
        """
        self.db = db
        cipher = load_content_cipher(settings)
        self._config = WorkerConfig(
            database_url=db.engine.url.render_as_string(hide_password=False),
            checkpoints_path=settings.state_dir / CHECKPOINTS_FILE_NAME,
            secret=secret,
            checkpoint_every=settings.audit_checkpoint_every,
            fsync=settings.audit_fsync,
            content_key=cipher.key if cipher is not None else None,
        )
        self._on_commit = on_commit
        self._ids = itertools.count(1)
        self._pending: list[Item] = []
        """Work submitted during this turn of the event loop, sent at its end: one frame
        and one wake-up of the worker per turn, not one per call."""
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: _Channel | None = None
        self._is_closed = False
        self._head: tuple[int, str] = (0, "")
        self._open_calls: dict[int, str] = {}
        """id(CallRecord) -> its `audit_open` row, from `open_call` to `append`."""

    @property
    def checkpoints_path(self) -> Path:
        return self._config.checkpoints_path

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest committed entry, as last acknowledged."""
        return self._head

    async def start(self) -> None:
        """Start the writer process; calls a stop left open are recorded first.

        Raises AuditWriteError when the log cannot be read or recovered.
        """
        if self._process is not None:
            raise RuntimeError("the audit log is already started")
        ours, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            try:
                self._process = await asyncio.to_thread(_launch_worker, fd)
            except OSError as exc:
                ours.close()
                raise AuditWriteError(f"cannot start the audit writer: {exc}") from exc
        loop = asyncio.get_running_loop()
        channel = self._channel = _Channel(loop, self._settle, self._on_lost)
        await loop.create_unix_connection(lambda: channel, sock=ours)
        channel.write(encode_frame(self._config))
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await channel.ready
        except (TimeoutError, EOFError, OSError) as exc:
            await self._abandon()
            raise AuditWriteError(f"the audit writer did not start: {exc!r}") from exc
        if ready.error is not None:
            await self._abandon()
            raise AuditWriteError(f"the audit log cannot start: {ready.error}")
        if ready.num_recovered:
            logger.warning("audit: %d call(s) left open by a stop recorded", ready.num_recovered)
        self._head = ready.head

    async def close(self) -> None:
        """Commit everything queued, write a `close` checkpoint, stop the writer process."""
        if self._process is None or self._is_closed:
            return
        self._is_closed = True
        if self._is_running:
            with contextlib.suppress(AuditWriteError):
                await self._submit("stop", None, check_open=False)
        await self._abandon()

    async def open_call(self, record: CallRecord, outcome: CallOutcome) -> None:
        """Send an `audit_open` row for a stream as its headers go out: should the server
        stop before `append`, the next start records the call as `audit.recovered`.

        Not waited for (the stream's first byte does not wait on a commit): the worker
        commits it before anything sent after it, the call's entry included, and commits
        what it received even when the gateway dies. A failed commit is logged; `append`
        reports its own.

        Raises AuditWriteError when the audit log is not running.
        """
        call_id = f"{id(self):x}-{next(self._ids)}"
        future = self._enqueue("open", call_values(record, outcome), call_id)
        future.add_done_callback(_log_open_failure)
        self._open_calls[id(record)] = call_id

    async def append(self, record: CallRecord, outcome: CallOutcome) -> None:
        """Return once the call's chained entry is committed (and its open row deleted).

        Raises AuditWriteError when it cannot be committed.
        """
        await self.start_append(record, outcome)

    def start_append(self, record: CallRecord, outcome: CallOutcome) -> asyncio.Future[None]:
        """`append`, sent now (not at the end of the loop turn: the writer starts on it while
        this turn goes on, e.g. relaying the usage to the client). The future resolves once
        the entry is committed, or fails with AuditWriteError (at once when the log is not
        running)."""
        call_id = self._open_calls.pop(id(record), None)
        try:
            committed = self._enqueue("append", call_values(record, outcome), call_id)
        except AuditWriteError as exc:
            committed = asyncio.get_running_loop().create_future()
            committed.set_exception(exc)
            return committed
        self._send_pending()
        return committed

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
        await self._submit("event", entry)

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
        count: int = await self._submit("purge", (before, actor, record_empty))
        return count

    async def _submit(
        self, kind: Kind, payload: Any, call_id: str | None = None, *, check_open: bool = True
    ) -> Any:
        return await self._enqueue(kind, payload, call_id, check_open=check_open)

    def _enqueue(
        self, kind: Kind, payload: Any, call_id: str | None = None, *, check_open: bool = True
    ) -> asyncio.Future[Any]:
        """Queue one item for the worker (sent at the end of this loop turn, or sooner by
        `start_append`); its future resolves when the worker acknowledges it. Raises
        AuditWriteError when not running."""
        if not self._is_running:
            raise AuditWriteError("the audit log is not running")
        if check_open and self._is_closed:
            raise AuditWriteError("the audit log is closed")
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._send_pending)
        work_id = next(self._ids)
        self._pending.append((kind, work_id, payload, call_id))
        future: asyncio.Future[Any] = loop.create_future()
        self._futures[work_id] = future
        return future

    def _send_pending(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        channel = self._channel
        if channel is None or not channel.is_open:
            self._fail([item[1] for item in pending], "the audit writer stopped")
            return
        try:
            frame = encode_frame(pending)
        except Exception:  # e.g. a detail value pickle cannot hold: fail only its own call
            for item in pending:
                try:
                    channel.write(encode_frame([item]))
                except Exception:
                    logger.exception("audit: a call's values cannot be sent to the writer")
                    self._fail([item[1]], "the audit log could not record this call")
            return
        channel.write(frame)

    @property
    def _is_running(self) -> bool:
        return self._channel is not None and self._channel.is_open

    def _on_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.error("audit: lost the connection to the writer process: %r", exc)
        if not self._is_closed:
            logger.error("audit: the writer process stopped; audited calls now fail (503)")
        self._fail(list(self._futures), "the audit writer stopped")

    def _settle(self, done: Done) -> None:
        self._head = done.head
        for work_id, error, result in done.results:
            future = self._futures.pop(work_id, None)
            if future is None or future.done():  # the caller was cancelled: committed anyway
                continue
            if error is None:
                future.set_result(result)
            else:
                logger.error("audit write failed: %s", error)
                future.set_exception(AuditWriteError("the audit log could not record this call"))
        if done.commit_s is not None and self._on_commit is not None:
            self._on_commit(done.commit_s, done.num_committed)

    def _fail(self, work_ids: list[int], message: str) -> None:
        for work_id in work_ids:
            future = self._futures.pop(work_id, None)
            if future is not None and not future.done():
                future.set_exception(AuditWriteError(message))

    async def _abandon(self) -> None:
        """Close the socket and reap the process (killed if it does not stop in time)."""
        if self._channel is not None:
            await self._channel.close()
        process = self._process
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.error("audit: the writer process did not stop; killing it")
                process.kill()
                await asyncio.to_thread(process.wait)


def _launch_worker(fd: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", _WORKER_MAIN, str(fd), json.dumps(sys.path)]
    return subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL)


class _Channel(asyncio.Protocol):
    """The socket to the writer process: frames out; `Ready`, then each batch's `Done` handed
    to `on_done` in the callback that reads it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[Done], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self.ready: asyncio.Future[Ready] = loop.create_future()
        self._on_done = on_done
        self._on_lost = on_lost
        self._lost: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.WriteTransport | None = None
        self._buffer = bytearray()

    @property
    def is_open(self) -> bool:
        return self.ready.done() and not self._lost.done() and self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for message in decode_frames(self._buffer):
            if isinstance(message, Ready) and not self.ready.done():
                self.ready.set_result(message)
            else:
                self._on_done(message)

    def eof_received(self) -> bool:
        return False  # the writer exited: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set_result(None)
        if not self.ready.done():
            self.ready.set_exception(EOFError("the audit writer exited"))
            return
        self._on_lost(exc)

    def write(self, frame: bytes) -> None:
        assert self._transport is not None
        self._transport.write(frame)

    async def close(self) -> None:
        """Close the socket; return once it is closed (the writer sees its end)."""
        if self._transport is not None:
            self._transport.close()
        await self._lost


def _log_open_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("the open row of a stream was not committed: %s", future.exception())
