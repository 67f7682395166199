"""The audit writer process: chains, commits, checkpoints and purges what the gateway sends.

The gateway's event loop only builds entries; this process does the rest on another core, so
hashing and database work never compete with request handling for the gateway's GIL. It
holds the only writing connection to the audit tables (seq numbers come from its memory).

Wire format, both ways over one socket pair: frames of a 4-byte big-endian length and a pickle.
Gateway → worker: a list of `Item` tuples (plain tuples pickle several times faster than
dataclasses; entries are made and content sealed here, not on the gateway's loop).
Worker → gateway: `Ready`, then one `Done` per batch.
Pickle is safe here: both ends are this program, and the socket is private to the pair.
"""

from __future__ import annotations

import logging
import pickle
import select
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from aicc.audit.checkpoints import CheckpointFile
from aicc.audit.entries import AuditEntry, ContentCipher, entry_from_values
from aicc.audit.store import Append, ChainStore, OpenCall
from aicc.auth.principal import Principal
from aicc.db import Database

logger = logging.getLogger(__name__)

MAX_BATCH = 256
"""Entries (and open rows) committed together at most."""
_DATA_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError)
"""Errors one entry's data can cause in the chain (with the database's own, `ChainStore.
data_errors`): the batch is then retried entry by entry."""
_HEADER = 4
_RECV_BYTES = 1 << 20
OPEN_HOLD_S = 0.5
"""Longest time open rows wait alone for the next entry to share its commit. Most streams
end sooner: their open row and entry then cancel out, one commit instead of two."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    database_url: str
    checkpoints_path: Path
    secret: bytes
    checkpoint_every: int
    fsync: bool
    content_key: bytes | None
    """Seals captured prompts and completions (None: capture off)."""


Kind = Literal["append", "open", "event", "purge", "stop"]
Item = tuple[Kind, int, Any, str | None]
"""(kind, work id, payload, call id). Payload: append/open, a call's `CallValues`; event, an
`AuditEntry`; purge, (cut, actor, record_empty); stop, None. The call id names the call's
`audit_open` row: inserted by open, deleted by append."""


@dataclass(frozen=True, slots=True)
class Work:
    """An `Item` made ready to commit."""

    id: int
    kind: Literal["append", "open", "purge", "stop"]
    entry: AuditEntry | None = None
    call_id: str | None = None
    """open: the `audit_open` row to insert; append: the row to delete with it."""
    cut: datetime | None = None
    actor: Principal | None = None
    record_empty: bool = True


@dataclass(frozen=True, slots=True)
class Ready:
    error: str | None
    num_recovered: int
    head: tuple[int, str]


@dataclass(frozen=True, slots=True)
class Done:
    results: list[tuple[int, str | None, Any]]
    """(work id, error message or None, result) per work item."""
    head: tuple[int, str]
    commit_s: float | None
    """Time the batch's commit took (None: no commit, e.g. a purge)."""
    num_committed: int


def encode_frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(payload).to_bytes(_HEADER, "big") + payload


def decode_frames(buffer: bytearray) -> list[Any]:
    """Every complete frame in `buffer`, removed from it; a partial frame stays."""
    messages = []
    offset = 0
    while len(buffer) - offset >= _HEADER:
        size = int.from_bytes(buffer[offset : offset + _HEADER], "big")
        end = offset + _HEADER + size
        if len(buffer) < end:
            break
        messages.append(pickle.loads(buffer[offset + _HEADER : end]))
        offset = end
    del buffer[:offset]
    return messages


def serve_fd(fd: int) -> None:
    """Process entry point: the first frame on socket `fd` is the `WorkerConfig`."""
    # The gateway decides when this process stops (it sends "stop", or its socket closes):
    # a signal to the whole process group (Ctrl-C, systemd, `timeout`) must not end the
    # log while the gateway still drains requests that need their entries.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="aicc-audit: %(levelname)s %(message)s")
    sock = socket.socket(fileno=fd)
    buffer = bytearray()
    while not (messages := decode_frames(buffer)):
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            return
        buffer += chunk
    config = messages[0]
    if not isinstance(config, WorkerConfig):
        raise TypeError(f"the audit worker expected its config, got {type(config).__name__}")
    run_worker(sock, config)


def run_worker(sock: socket.socket, config: WorkerConfig) -> None:
    """Serve until told to stop or the gateway goes away (then commit what arrived,
    checkpoint and exit — a gateway's kill -9 loses nothing it was told of)."""
    store = ChainStore(
        Database(config.database_url),
        CheckpointFile(config.checkpoints_path, config.secret),
        config.checkpoint_every,
        fsync=config.fsync,
    )
    try:
        num_recovered = store.prepare()
    except Exception as exc:
        logger.exception("the audit log cannot start")
        store.release()
        sock.sendall(encode_frame(Ready(f"{type(exc).__name__}: {exc}", 0, (0, ""))))
        return
    sock.sendall(encode_frame(Ready(None, num_recovered, (store.head_seq, store.head_hash))))
    cipher = ContentCipher(config.content_key) if config.content_key is not None else None
    _Server(sock, store, cipher).serve()


class _Server:
    def __init__(
        self, sock: socket.socket, store: ChainStore, cipher: ContentCipher | None
    ) -> None:
        self._sock = sock
        self._store = store
        self._cipher = cipher
        self._buffer = bytearray()
        self._data_errors = (*_DATA_ERRORS, *store.data_errors)

    def serve(self) -> None:
        held: list[Work] = []  # open rows waiting for company (see OPEN_HOLD_S)
        held_since = 0.0
        while True:
            wait_s = None if not held else max(held_since + OPEN_HOLD_S - time.monotonic(), 0)
            works, is_eof = self._receive(wait_s)
            if not is_eof and all(work.kind == "open" for work in works):
                if works and not held:
                    held_since = time.monotonic()
                held += works
                if time.monotonic() - held_since < OPEN_HOLD_S:
                    continue
            works, held = held + works, []
            for batch in _batches(works):
                kind = batch[0].kind
                if kind == "stop":
                    self._stop(batch[0])
                    return
                if kind == "purge":
                    self._send(self._purge(batch[0]))
                else:
                    self._send(self._commit(batch))
            if is_eof:
                self._stop(None)
                return

    def _receive(self, wait_s: float | None) -> tuple[list[Work], bool]:
        """Block for the first bytes (at most `wait_s`, then nothing), then take whatever
        else has arrived."""
        works: list[Work] = []
        is_eof = False
        flags = 0
        if wait_s is not None and not select.select([self._sock], [], [], wait_s)[0]:
            return works, is_eof
        while True:
            try:
                chunk = self._sock.recv(_RECV_BYTES, flags)
            except BlockingIOError:
                break
            except OSError:
                is_eof = True
                break
            if not chunk:
                is_eof = True
                break
            self._buffer += chunk
            for frame in decode_frames(self._buffer):
                works.extend(self._prepare(frame))
            flags = socket.MSG_DONTWAIT if works else 0
        return works, is_eof

    def _prepare(self, items: list[Item]) -> list[Work]:
        """Entries made from the items; an item that cannot become one fails alone, now."""
        works = []
        for kind, work_id, payload, call_id in items:
            try:
                works.append(self._work(kind, work_id, payload, call_id))
            except (TypeError, ValueError) as exc:
                logger.exception("an audit entry could not be made")
                self._send(self._failed([Work(work_id, "append")], exc))
        return works

    def _work(self, kind: Kind, work_id: int, payload: Any, call_id: str | None) -> Work:
        if kind == "append":
            return Work(work_id, kind, entry_from_values(payload, self._cipher), call_id)
        if kind == "open":
            return Work(work_id, kind, entry_from_values(payload), call_id)
        if kind == "event":
            return Work(work_id, "append", entry=payload)
        if kind == "purge":
            cut, actor, record_empty = payload
            return Work(work_id, kind, cut=cut, actor=actor, record_empty=record_empty)
        return Work(work_id, "stop")

    def _send(self, done: Done) -> None:
        try:
            self._sock.sendall(encode_frame(done))
        except OSError:
            logger.debug("the gateway went away before its acknowledgement")

    def _commit(self, batch: list[Work]) -> Done:
        """Commit the batch. A call opened and appended in the same batch needs no open row:
        neither its insert nor its delete is written."""
        started = time.perf_counter()
        opened = {w.call_id for w in batch if w.kind == "open" and w.entry is not None}
        closed = {w.call_id for w in batch if w.kind == "append" and w.entry is not None}
        both = opened & closed
        opens = [
            OpenCall(w.call_id, w.entry)
            for w in batch
            if w.kind == "open" and w.entry is not None and w.call_id is not None
            and w.call_id not in both
        ]  # fmt: skip
        appends = [
            Append(w.entry, None if w.call_id in both else w.call_id)
            for w in batch
            if w.kind == "append" and w.entry is not None
        ]
        try:
            self._store.commit(opens, appends)
        except self._data_errors as exc:
            self._store.reset()
            if len(batch) > 1:  # one bad entry must not fail its neighbours
                parts = [self._commit([work]) for work in batch]
                return Done(
                    [result for part in parts for result in part.results],
                    self._head(),
                    sum(part.commit_s or 0.0 for part in parts),
                    sum(part.num_committed for part in parts),
                )
            logger.exception("an audit entry was refused by the database")
            return self._failed(batch, exc)
        except Exception as exc:
            logger.exception("audit commit failed")
            self._store.reset()
            return self._failed(batch, exc)
        results: list[tuple[int, str | None, Any]] = [(work.id, None, None) for work in batch]
        return Done(results, self._head(), time.perf_counter() - started, len(batch))

    def _purge(self, work: Work) -> Done:
        assert work.cut is not None  # set by `AuditLog.purge`
        try:
            count = self._store.purge(work.cut, work.actor, record_empty=work.record_empty)
        except Exception as exc:
            logger.exception("audit purge failed")
            self._store.reset()
            return self._failed([work], exc)
        return Done([(work.id, None, count)], self._head(), None, 0)

    def _stop(self, work: Work | None) -> None:
        self._store.checkpoint("close", only_if_new=True)
        self._store.release()
        if work is not None:
            self._send(Done([(work.id, None, None)], self._head(), None, 0))

    def _failed(self, batch: list[Work], exc: BaseException) -> Done:
        message = f"{type(exc).__name__}: {exc}"
        return Done([(work.id, message, None) for work in batch], self._head(), None, 0)

    def _head(self) -> tuple[int, str]:
        return self._store.head_seq, self._store.head_hash


def _batches(works: list[Work]) -> list[list[Work]]:
    """Runs of opens/appends (≤ MAX_BATCH each) in order; a purge or stop alone."""
    batches: list[list[Work]] = []
    current: list[Work] = []
    for work in works:
        if work.kind in ("purge", "stop"):
            if current:
                batches.append(current)
                current = []
            batches.append([work])
            continue
        current.append(work)
        if len(current) == MAX_BATCH:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches
