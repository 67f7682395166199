"""Reading the log: filters, pages by seq, full iteration (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aicc.audit import AuditLog
from aicc.audit.query import query
from aicc.config import Settings
from aicc.db import Database
from tests.audit.conftest import days_ago, make_call, with_log


@pytest.fixture
def filled_db(audit_db: Database, settings: Settings) -> Database:
    async def body(log: AuditLog) -> None:
        calls = [
            make_call(username="alice", model="tiny", status=200, started_at=days_ago(3)),
            make_call(username="bob", model="tiny", status=429, started_at=days_ago(2)),
            make_call(username="alice", model="big", status=200, started_at=days_ago(1)),
            make_call(username=None, model=None, status=401),
        ]
        for call in calls:
            await log.append(*call)
        await log.append_event(action="server.start", principal=None, detail={})

    with_log(audit_db, settings, body)
    return audit_db


def test_filters_combine(filled_db: Database) -> None:
    def seqs(**filters: object) -> list[int]:
        return [e.seq for e in query(filled_db, **filters)]  # type: ignore[arg-type]

    now = datetime.now(UTC)
    assert seqs() == [1, 2, 3, 4, 5]
    assert seqs(username="alice") == [1, 3]
    assert seqs(model="tiny") == [1, 2]
    assert seqs(status=200) == [1, 3, 5]
    assert seqs(action="server.start") == [5]
    assert seqs(since=now - timedelta(days=2.5), until=now - timedelta(hours=12)) == [2, 3]
    assert seqs(username="alice", model="big") == [3]
    assert seqs(username="nobody") == []


def test_pages_by_seq(filled_db: Database) -> None:
    first = query(filled_db, limit=2)
    second = query(filled_db, after_seq=first[-1].seq, limit=2)
    third = query(filled_db, after_seq=second[-1].seq, limit=2)
    assert [[e.seq for e in page] for page in (first, second, third)] == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="limit"):
        query(filled_db, limit=0)
    with pytest.raises(ValueError, match="aware"):
        query(filled_db, since=datetime(2025, 1, 1))
