"""Tokens per day on a real SQLite database: buffered, flushed in batches, reloaded."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import OperationalError

from aicc.auth.principal import Limits
from aicc.db import Database
from aicc.db.models import DailyUsage
from aicc.errors import RateLimitedError
from aicc.quota import RateLimiter, daily
from aicc.quota.daily import DailyUsageStore, upsert_statement, utc_day
from tests.quota.test_limiter import Clock, principal

NOON = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'state.db'}")
    database.migrate()
    yield database
    database.close()


def rows(db: Database) -> dict[tuple[str, str], int]:
    with db.session() as session:
        found = session.scalars(select(DailyUsage)).all()
        return {(row.subject, row.day): row.num_tokens for row in found}


def test_tpd_survives_a_new_limiter_on_the_same_database(db: Database) -> None:
    wall = Clock(NOON)
    who = principal(Limits(tpd=1000), Limits(tpd=5000))
    first = RateLimiter(db, clock=Clock(0.0), wall_clock=wall)
    first.acquire(who).record(500, 100)
    asyncio.run(first.close())
    assert rows(db) == {("user:7", "2026-03-10"): 600, ("key:key_0123456789ab", "2026-03-10"): 600}

    second = RateLimiter(db, clock=Clock(0.0), wall_clock=wall)
    second.acquire(who).record(300, 100)  # loaded 600 on acquire: now 1000
    with pytest.raises(RateLimitedError, match="1000 tokens per day for user alice7"):
        second.acquire(who)
    # A third process that starts before the second flushes sees only what was written.
    third = RateLimiter(db, clock=Clock(0.0), wall_clock=wall)
    third.acquire(who)
    asyncio.run(second.flush())
    assert rows(db)[("user:7", "2026-03-10")] == 1000
    fourth = RateLimiter(db, clock=Clock(0.0), wall_clock=wall)
    with pytest.raises(RateLimitedError):
        fourth.acquire(who)


def test_a_first_load_adds_increments_not_yet_written(db: Database) -> None:
    store = DailyUsageStore(db, Clock(NOON))
    store.add("user:1", 10)
    assert store.flush() == 1
    store.add("user:1", 5)  # buffered, before the subject is first read
    assert store.total("user:1") == 15
    store.add("user:1", 1)
    assert store.total("user:1") == 16
    assert store.num_pending == 1
    store.flush()
    assert store.num_pending == 0
    assert rows(db) == {("user:1", "2026-03-10"): 16}
    assert store.flush() == 0


def test_flushes_from_two_stores_add_up(db: Database) -> None:
    one, two = DailyUsageStore(db, Clock(NOON)), DailyUsageStore(db, Clock(NOON))
    for store, num_tokens in ((one, 3), (two, 4), (one, 5)):
        store.add("key:key_0123456789ab", num_tokens)
        store.add("user:1", 1)
        store.flush()
    assert rows(db) == {("key:key_0123456789ab", "2026-03-10"): 12, ("user:1", "2026-03-10"): 3}


def test_the_day_rolls_over_at_utc_midnight(db: Database) -> None:
    wall = Clock(NOON + 12 * 3600 - 0.5)  # 23:59:59.5
    store = DailyUsageStore(db, wall)
    assert store.seconds_to_midnight() == 1
    store.add("user:1", 100)
    assert store.total("user:1") == 100
    wall.now += 1.0
    assert store.seconds_to_midnight() == 86400
    assert store.total("user:1") == 0
    store.add("user:1", 7)
    store.flush()  # yesterday's tokens are written under yesterday
    assert rows(db) == {("user:1", "2026-03-10"): 100, ("user:1", "2026-03-11"): 7}
    assert DailyUsageStore(db, wall).total("user:1") == 7
    assert utc_day(NOON) == "2026-03-10"


def test_a_failed_flush_keeps_the_increments(db: Database) -> None:
    store = DailyUsageStore(db, Clock(NOON))
    store.add("user:1", 10)
    DailyUsage.__table__.drop(db.engine)
    with pytest.raises(OperationalError):
        store.flush()
    store.add("user:1", 5)
    assert store.num_pending == 1
    DailyUsage.__table__.create(db.engine)
    store.flush()
    assert rows(db) == {("user:1", "2026-03-10"): 15}


def test_other_backends_update_then_insert(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daily, "upsert_statement", lambda dialect: None)
    store = DailyUsageStore(db, Clock(NOON))
    store.add("user:1", 2)
    store.flush()
    store.add("user:1", 3)
    store.add("user:2", 4)
    store.flush()
    assert rows(db) == {("user:1", "2026-03-10"): 5, ("user:2", "2026-03-10"): 4}


def test_the_postgresql_upsert_adds_on_conflict() -> None:
    sql = str(upsert_statement("postgresql").compile(dialect=postgresql.dialect()))
    assert "ON CONFLICT (subject, day) DO UPDATE SET num_tokens = " in sql
    assert "daily_usage.num_tokens + excluded.num_tokens" in sql
    assert upsert_statement("mysql") is None


def test_the_periodic_task_writes_and_close_stops_it(db: Database) -> None:
    async def scenario() -> dict[tuple[str, str], int]:
        limiter = RateLimiter(db, wall_clock=Clock(NOON))
        limiter.start(flush_interval_s=0.01)
        limiter.acquire(principal(Limits())).record(2, 3)
        for _ in range(500):
            if rows(db):
                break
            await asyncio.sleep(0.01)
        written = rows(db)
        limiter.acquire(principal(Limits())).record(1, 0)
        await limiter.close()
        return written

    assert asyncio.run(scenario()) == {("user:7", "2026-03-10"): 5}
    assert rows(db) == {("user:7", "2026-03-10"): 6}


def test_without_a_database_the_day_is_kept_in_memory() -> None:
    store = DailyUsageStore(None, Clock(NOON))
    store.add("user:1", 4)
    store.add("user:1", 4)
    assert store.total("user:1") == 8
    assert store.flush() == 0
    assert store.total("user:1") == 8
