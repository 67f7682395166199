"""Retention: a purge deletes the old prefix, checkpoints the cut, is itself audited, and leaves
a chain that still verifies; the daily task purges by `audit_retention_days`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aicc.audit import AuditLog, RetentionTask, verify
from aicc.audit.query import query
from aicc.config import Settings
from aicc.db import Database
from aicc.errors import ConfigError
from tests.audit.conftest import SECRET, days_ago, make_call, make_principal, with_log

CUT = timedelta(days=180)


def _write(log: AuditLog, ages_in_days: list[float]) -> asyncio.Future[list[None]]:
    return asyncio.gather(
        *(log.append(*make_call(started_at=days_ago(age))) for age in ages_in_days)
    )


def _checkpoint_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_purge_deletes_the_old_prefix_and_keeps_the_chain_verifiable(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def body(log: AuditLog) -> int:
        for age in [300] * 10 + [10] * 5:  # one by one: seq order = age order
            await log.append(*make_call(started_at=days_ago(age)))
        count = await log.purge(datetime.now(UTC) - CUT, actor=make_principal("auditor1"))
        await log.append(*make_call())
        return count

    assert with_log(audit_db, settings, body) == 10
    entries = query(audit_db, limit=100)
    assert [e.seq for e in entries] == list(range(11, 18))
    purge = entries[5]
    assert (purge.seq, purge.action, purge.username) == (16, "audit.purge", "auditor1")
    assert purge.detail is not None
    assert (purge.detail["actor"], purge.detail["count"], purge.detail["through_seq"]) == (
        "auditor1",
        10,
        10,
    )
    cut_lines = [line for line in _checkpoint_lines(checkpoints_path) if line["reason"] == "purge"]
    assert [(line["seq"], line["count"]) for line in cut_lines] == [(10, 15)]
    assert entries[0].prev_hash == cut_lines[0]["hash"]
    report = verify(audit_db, checkpoints_path, SECRET)
    assert (report.ok, report.num_checked) == (True, 7)


def test_the_purge_checkpoint_is_what_vouches_for_the_start(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def body(log: AuditLog) -> None:
        for age in [300] * 4 + [1] * 2:
            await log.append(*make_call(started_at=days_ago(age)))
        await log.purge(datetime.now(UTC) - CUT, actor=None)

    with_log(audit_db, settings, body)
    kept = [line for line in _checkpoint_lines(checkpoints_path) if line["reason"] != "purge"]
    checkpoints_path.write_text("".join(json.dumps(line) + "\n" for line in kept))
    report = verify(audit_db, checkpoints_path, SECRET)
    assert (report.ok, report.first_bad_seq) == (False, 1)


def test_purges_repeat_and_survive_restarts(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def first(log: AuditLog) -> int:
        await _write(log, [400, 400])
        await log.append(*make_call(started_at=days_ago(250)))
        return await log.purge(datetime.now(UTC) - timedelta(days=300), actor=None)

    async def second(log: AuditLog) -> int:
        await log.append(*make_call(started_at=days_ago(1)))
        return await log.purge(datetime.now(UTC) - CUT, actor=None)

    assert with_log(audit_db, settings, first) == 2
    assert with_log(audit_db, settings, second) == 1  # seq 3; the first purge entry is young
    assert [(e.seq, e.action) for e in query(audit_db)] == [
        (4, "audit.purge"),
        (5, "api.call"),
        (6, "audit.purge"),
    ]
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_a_purge_never_leaves_a_hole(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def body(log: AuditLog) -> int:
        for age in (300, 1, 300, 300):  # a young entry among old ones
            await log.append(*make_call(started_at=days_ago(age)))
        return await log.purge(datetime.now(UTC) - CUT, actor=None)

    assert with_log(audit_db, settings, body) == 1
    assert [e.seq for e in query(audit_db)] == [2, 3, 4, 5]
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_an_empty_purge_is_recorded_unless_asked_not_to(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def body(log: AuditLog) -> tuple[int, int]:
        await log.append(*make_call())
        cut = datetime.now(UTC) - CUT
        recorded = await log.purge(cut, actor=None)
        return recorded, await log.purge(cut, actor=None, record_empty=False)

    assert with_log(audit_db, settings, body) == (0, 0)
    entries = query(audit_db)
    assert [e.action for e in entries] == ["api.call", "audit.purge"]
    assert entries[1].detail is not None
    assert entries[1].detail["count"] == 0
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_a_purge_of_everything_keeps_its_own_entry(
    audit_db: Database, settings: Settings, checkpoints_path: Path
) -> None:
    async def body(log: AuditLog) -> int:
        await _write(log, [1, 1, 1])
        return await log.purge(datetime.now(UTC) + timedelta(days=1), actor=None)

    assert with_log(audit_db, settings, body) == 3
    assert [(e.seq, e.action) for e in query(audit_db)] == [(4, "audit.purge")]
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_a_naive_cut_is_refused(audit_db: Database, settings: Settings) -> None:
    async def body(log: AuditLog) -> int:
        return await log.purge(datetime(2025, 1, 1), actor=None)

    with pytest.raises(ValueError, match="aware"):
        with_log(audit_db, settings, body)


def test_the_daily_task_purges_by_retention(
    audit_db: Database, make_settings: Callable[..., Settings], checkpoints_path: Path
) -> None:
    settings = make_settings(audit_retention_days=30, audit_retention_force=True)
    now = datetime.now(UTC)

    async def body(log: AuditLog) -> int:
        await _write(log, [40, 40])
        await log.append(*make_call(started_at=days_ago(20)))
        task = RetentionTask(log, settings, interval_s=3600, clock=lambda: now)
        task.start()
        for _ in range(200):  # the first purge runs at once
            if log.head[0] == 4:
                break
            await asyncio.sleep(0.02)
        await task.close()
        return await task.run_once()  # nothing left to purge: no entry

    assert with_log(audit_db, settings, body) == 0
    entries = query(audit_db)
    assert [(e.seq, e.action) for e in entries] == [(3, "api.call"), (4, "audit.purge")]
    assert entries[1].detail is not None
    assert entries[1].detail["actor"] == "system (retention)"
    assert verify(audit_db, checkpoints_path, SECRET).ok


def test_a_short_retention_needs_force(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="180 days"):
        make_settings(audit_retention_days=30)
    assert make_settings(audit_retention_days=30, audit_retention_force=True)
