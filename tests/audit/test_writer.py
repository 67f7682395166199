"""The writer: group commits, a contiguous chain, durability, open calls and crash recovery,
failures that fail only their own calls. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from aicc.audit import AuditLog, AuditWriteError, verify
from aicc.audit.chain import GENESIS_HASH
from aicc.audit.entries import ContentCipher
from aicc.audit.query import query
from aicc.audit.worker import OPEN_HOLD_S
from aicc.config import Settings
from aicc.db import Database
from tests.audit.conftest import SECRET, make_call, with_log

KEY_HEX = "42" * 32


def _count(db: Database, table: str) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_concurrent_appends_share_commits_and_form_one_chain(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    commits: list[tuple[float, int]] = []

    async def body(log: AuditLog) -> None:
        await asyncio.gather(*(log.append(*make_call(status=200 + i % 3)) for i in range(300)))
        assert log.head[0] == 300

    with_log(audit_db, settings, body, on_commit=lambda s, n: commits.append((s, n)))
    entries = query(audit_db, limit=1000)
    assert [e.seq for e in entries] == list(range(1, 301))
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert sum(n for _, n in commits) == 300
    assert max(n for _, n in commits) > 1  # group commit happened
    assert all(seconds >= 0 for seconds, _ in commits)
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_append_returns_after_the_commit(audit_db: Database, settings: Settings) -> None:
    record, outcome = make_call(model="tiny", detail={"user": "bob"})

    async def body(log: AuditLog) -> None:
        await log.append(record, outcome)
        # Another connection sees it at once: it was committed before append returned.
        rows = await asyncio.to_thread(query, audit_db)
        assert [row.request_id for row in rows] == [record.request_id]

    with_log(audit_db, settings, body)
    (entry,) = query(audit_db)
    assert (entry.username, entry.key_id, entry.roles, entry.model) == (
        "alice",
        "key_0123456789ab",
        ("user",),
        "tiny",
    )
    assert (entry.status, entry.latency_ms, entry.body_sha256) == (200, 12.346, "ab" * 32)
    assert entry.detail == {"user": "bob"}
    assert entry.compute_hash() == entry.hash


def test_events_are_chained_too(audit_db: Database, settings: Settings) -> None:
    async def body(log: AuditLog) -> None:
        await log.append_event(action="server.start", principal=None, detail={"version": "1"})
        await log.append(*make_call())

    with_log(audit_db, settings, body)
    first, second = query(audit_db)
    assert (first.action, first.status, first.detail) == ("server.start", 200, {"version": "1"})
    assert second.prev_hash == first.hash


def test_a_refused_entry_fails_alone_and_the_writer_goes_on(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    # A database-side refusal of status 418, on both backends.
    with audit_db.engine.begin() as conn:
        if audit_db.is_sqlite:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_418 BEFORE INSERT ON audit_log WHEN NEW.status = 418 "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        else:
            conn.exec_driver_sql(
                "ALTER TABLE audit_log ADD CONSTRAINT refuse_418 CHECK (status <> 418)"
            )

    async def body(log: AuditLog) -> list[Any]:
        calls = [make_call(status=s) for s in (200, 418, 201, 202)]
        results = await asyncio.gather(*(log.append(*c) for c in calls), return_exceptions=True)
        await log.append(*make_call(status=203))
        return results

    results = with_log(audit_db, settings, body)
    assert [type(r).__name__ for r in results] == [
        "NoneType",
        "AuditWriteError",
        "NoneType",
        "NoneType",
    ]
    assert [e.status for e in query(audit_db)] == [200, 201, 202, 203]
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_checkpoints_every_n_entries_and_at_close(
    audit_db: Database, make_settings: Callable[..., Settings], checkpoints_path: Path
) -> None:
    settings = make_settings(audit_checkpoint_every=5)

    async def body(log: AuditLog) -> None:
        for _ in range(12):
            await log.append(*make_call())

    with_log(audit_db, settings, body)
    lines = [json.loads(line) for line in checkpoints_path.read_text().splitlines()]
    assert [(line["seq"], line["reason"]) for line in lines] == [
        (5, "periodic"),
        (10, "periodic"),
        (12, "close"),
    ]
    by_seq = {e.seq: e.hash for e in query(audit_db)}
    assert all(by_seq[line["seq"]] == line["hash"] for line in lines)
    assert lines[-1]["count"] == 12


def test_a_restart_continues_the_chain(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def body(log: AuditLog) -> None:
        await log.append(*make_call())
        await log.append(*make_call())

    with_log(audit_db, settings, body)
    with_log(audit_db, settings, body)
    assert [e.seq for e in query(audit_db)] == [1, 2, 3, 4]
    report = verify(audit_db, checkpoints_path, SECRET)
    assert (report.ok, report.num_checked) == (True, 4)


def test_a_stream_is_open_until_appended(audit_db: Database, settings: Settings) -> None:
    record, outcome = make_call(is_stream=True)

    async def body(log: AuditLog) -> None:
        await log.open_call(record, outcome)  # sent, not waited for: committed shortly
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(_count, audit_db, "audit_open") != 1:
            assert time.monotonic() < deadline, "the open row was not committed"
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(_count, audit_db, "audit_log") == 0
        await log.append(record, outcome)

    with_log(audit_db, settings, body)
    assert _count(audit_db, "audit_open") == 0
    assert [e.action for e in query(audit_db)] == ["api.call"]


def test_a_short_stream_shares_one_commit_and_leaves_no_open_row(
    audit_db: Database, settings: Settings
) -> None:
    commits: list[int] = []
    calls = [make_call(is_stream=True) for _ in range(5)]

    async def body(log: AuditLog) -> None:
        for record, outcome in calls:
            await log.open_call(record, outcome)
            await asyncio.sleep(0.002)  # a stream far shorter than OPEN_HOLD_S
            await log.append(record, outcome)
            assert await asyncio.to_thread(_count, audit_db, "audit_open") == 0

    with_log(audit_db, settings, body, on_commit=lambda _s, n: commits.append(n))
    assert OPEN_HOLD_S >= 0.05
    # Each open row waited for its entry (one commit per call, not two), unless the machine
    # stalled for most of the hold.
    assert len(commits) <= 7, commits
    assert [e.request_id for e in query(audit_db)] == [r.request_id for r, _ in calls]


def test_calls_left_open_are_recovered_at_start(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    record, outcome = make_call(is_stream=True)

    async def crash(log: AuditLog) -> None:
        await log.append(*make_call())
        await log.open_call(record, outcome)  # the server dies before the stream ends

    async def restart(log: AuditLog) -> None:
        await log.append(*make_call())

    with_log(audit_db, settings, crash)
    with_log(audit_db, settings, restart)
    entries = query(audit_db)
    assert [(e.seq, e.action) for e in entries] == [
        (1, "api.call"),
        (2, "audit.recovered"),
        (3, "api.call"),
    ]
    recovered = entries[1]
    assert (recovered.request_id, recovered.status, recovered.username) == (
        record.request_id,
        0,
        "alice",
    )
    assert _count(audit_db, "audit_open") == 0
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_a_closed_log_refuses_appends(audit_db: Database, settings: Settings) -> None:
    async def main() -> None:
        log = AuditLog(audit_db, settings, SECRET)
        with pytest.raises(AuditWriteError):
            await log.append(*make_call())
        await log.start()
        await log.close()
        with pytest.raises(AuditWriteError):
            await log.append(*make_call())

    asyncio.run(main())


def test_captured_content_is_encrypted(
    audit_db: Database, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AICC_AUDIT_CONTENT_KEY", KEY_HEX)
    record, outcome = make_call(prompt="the prompt", completion=("the ", "answer"))

    async def body(log: AuditLog) -> None:
        await log.append(record, outcome)

    with_log(audit_db, make_settings(audit_capture_content=True), body)
    with_log(audit_db, make_settings(), body)  # capture off: nothing stored
    captured, plain = query(audit_db)
    assert captured.prompt_enc is not None
    assert captured.completion_enc is not None
    cipher = ContentCipher(bytes.fromhex(KEY_HEX))
    assert cipher.open(captured.prompt_enc, record.request_id, "prompt") == "the prompt"
    assert cipher.open(captured.completion_enc, record.request_id, "completion") == "the answer"
    assert (plain.prompt_enc, plain.completion_enc) == (None, None)


def _writer_pids() -> list[int]:
    """This process's audit writer children."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == os.getpid() and b"aicc.audit.worker" in command:
            pids.append(int(stat.parent.name))
    return pids


def test_calls_fail_at_once_when_the_writer_dies(audit_db: Database, settings: Settings) -> None:
    async def main() -> list[Any]:
        others = set(_writer_pids())  # e.g. a server another test module keeps running
        log = AuditLog(audit_db, settings, SECRET)
        await log.start()
        try:
            await log.append(*make_call(request_id="before"))
            (pid,) = set(_writer_pids()) - others
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(10):  # none waits for an acknowledgement forever
                waiting = [log.append(*make_call()) for _ in range(3)]
                results = await asyncio.gather(*waiting, return_exceptions=True)
                with pytest.raises(AuditWriteError):
                    await log.append(*make_call())
        finally:
            async with asyncio.timeout(10):
                await log.close()
        return results

    results = asyncio.run(main())
    assert [type(r) for r in results] == [AuditWriteError] * 3
    assert [e.request_id for e in query(audit_db)] == ["before"]


_KILLED_CHILD = """
import asyncio, os, signal, sys
from aicc.audit import AuditLog
from aicc.config import load_settings
from aicc.db import Database
from tests.audit.conftest import SECRET, make_call

async def main():
    log = AuditLog(Database(sys.argv[1]), load_settings(state_dir=sys.argv[2]), SECRET)
    await log.start()
    await log.append(*make_call(request_id="acknowledged"))
    print("ok", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_an_acknowledged_entry_survives_kill_9(audit_db: Database, settings: Settings) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(audit_db.engine.url.render_as_string(False)),
         str(settings.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout == "ok\n"
    assert [e.request_id for e in query(audit_db)] == ["acknowledged"]
