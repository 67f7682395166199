"""Identity fixtures: a migrated database per test, a settable clock, a fast argon2id hasher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from aicc.auth.passwords import Passwords
from aicc.auth.service import IdentityService
from aicc.config import Settings, load_settings
from aicc.db import Database
from tests.conftest import migrated_database

SECRET = bytes(range(32))
STRONG_PASSWORD = "Correct-Horse-9"


class FakeClock:
    """The service's clock; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class FakeDirectory:
    """A directory with fixed accounts: username -> (password, DirectoryUser)."""

    accounts: dict[str, tuple[str, Any]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def authenticate(self, username: str, password: str) -> Any:
        self.calls.append(username)
        entry = self.accounts.get(username.lower())
        if entry is None or not password or entry[0] != password:
            return None
        return entry[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def identity_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty state database: every test using it runs on SQLite and PostgreSQL."""
    db = migrated_database(request, tmp_path)
    yield db
    db.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def fast_passwords() -> Passwords:
    # Real argon2id, cheap parameters: tests hash many passwords on 2 shared cores.
    return Passwords(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def make_service(
    identity_db: Database, tmp_path: Path, clock: FakeClock, fast_passwords: Passwords
) -> Callable[..., IdentityService]:
    def make(ldap: Any = None, **overrides: Any) -> IdentityService:
        options: dict[str, Any] = {"lockout_threshold": 3, "lockout_s": 60}
        settings: Settings = load_settings(state_dir=tmp_path, **{**options, **overrides})
        service = IdentityService(
            identity_db, settings, SECRET, ldap, clock=clock, passwords=fast_passwords
        )
        service.ensure_builtin_roles()
        return service

    return make


@pytest.fixture
def service(make_service: Callable[..., IdentityService]) -> IdentityService:
    return make_service()
