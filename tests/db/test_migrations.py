"""The migrations and the ORM models agree, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.exc import StatementError

from aicc.db import MIGRATIONS_DIR, Database
from aicc.db.models import Base, User
from tests.fixtures.postgres import find_postgres_bin, postgres_server


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'aicc.db'}")
        yield db
        db.close()
        return
    if find_postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with postgres_server() as url:
        db = Database(url)
        yield db
        db.close()


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def test_migrate_is_idempotent(database: Database) -> None:
    database.migrate()
    database.migrate()
    with database.engine.connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert [row[0] for row in versions] == [head_revision()]


def test_migrations_match_the_models(database: Database) -> None:
    database.migrate()
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_datetimes_round_trip_as_aware_utc(database: Database) -> None:
    database.migrate()
    beijing = timezone(timedelta(hours=8))
    login = datetime(2025, 3, 1, 20, 30, 15, 123456, tzinfo=beijing)
    with database.session() as session:
        session.add(User(username="round-trip", last_login_at=login))
    with database.session() as session:
        user = session.scalars(select(User).where(User.username == "round-trip")).one()
        assert user.last_login_at == login
        assert user.last_login_at is not None
        assert user.last_login_at.tzinfo is UTC
        assert user.last_login_at.hour == 12
        assert user.created_at.tzinfo is UTC
        assert abs(datetime.now(UTC) - user.created_at) < timedelta(minutes=5)
        session.delete(user)


def test_naive_datetimes_are_refused(database: Database) -> None:
    database.migrate()
    naive = User(username="naive", last_login_at=datetime(2025, 1, 1))
    # The commit at the end of the session flushes, and the type refuses the value.
    with pytest.raises(StatementError, match="naive datetime"), database.session() as session:
        session.add(naive)
