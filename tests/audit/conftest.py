"""Audit fixtures: a migrated database per test (SQLite and PostgreSQL), settings in a temp state
dir, and `make_call` to build the CallRecord/CallOutcome pair the middleware would hand over."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aicc.api.record import CallOutcome, CallRecord
from aicc.audit import AuditLog
from aicc.audit.checkpoints import CHECKPOINTS_FILE_NAME
from aicc.auth.permissions import Permission
from aicc.auth.principal import Limits, Principal
from aicc.config import Settings, load_settings
from aicc.db import Database
from tests.conftest import migrated_database

SECRET = bytes(range(32))
T = TypeVar("T")


def make_principal(
    username: str = "alice", *, roles: tuple[str, ...] = ("user",), via: str = "key"
) -> Principal:
    return Principal(
        user_id=7,
        username=username,
        roles=roles,
        permissions=frozenset({Permission.INFERENCE}),
        models=("*",),
        via="key" if via == "key" else "session",
        credential_id="key_0123456789ab" if via == "key" else "ses_0123456789ab",
        user_limits=Limits(),
    )


def make_call(
    *,
    username: str | None = "alice",
    status: int = 200,
    model: str | None = "tiny",
    method: str = "POST",
    route: str = "/v1/chat/completions",
    path: str | None = None,
    started_at: float | None = None,
    prompt: str | None = None,
    completion: tuple[str, ...] = (),
    detail: dict[str, Any] | None = None,
    request_id: str | None = None,
    is_stream: bool = False,
) -> tuple[CallRecord, CallOutcome]:
    """A finished call as the recording middleware would describe it."""
    record = CallRecord(request_id or uuid.uuid4().hex)
    if started_at is not None:
        record.started_at = started_at
    record.principal = make_principal(username) if username else None
    record.model = model
    record.num_prompt_tokens = 12
    record.num_completion_tokens = 5
    record.finish_reason = "stop"
    record.is_stream = is_stream
    record.detail = detail
    record.prompt_text = prompt
    record.completion_text = list(completion)
    outcome = CallOutcome(
        method=method,
        route=route,
        path=path or route,
        status=status,
        latency_s=0.0123456,
        client_addr="127.0.0.1",
        body_sha256="ab" * 32,
    )
    return record, outcome


def days_ago(days: float) -> float:
    return time.time() - days * 86400


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty state database: every test using it runs on SQLite and PostgreSQL."""
    db = migrated_database(request, tmp_path)
    yield db
    db.close()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return load_settings(state_dir=tmp_path / "state", **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def checkpoints_path(settings: Settings) -> Path:
    return settings.state_dir / CHECKPOINTS_FILE_NAME


def with_log(
    db: Database,
    settings: Settings,
    body: Callable[[AuditLog], Awaitable[T]],
    **options: Any,
) -> T:
    """Run `body` against a started audit log, closing it afterwards (on its own loop)."""

    async def main() -> T:
        log = AuditLog(db, settings, SECRET, **options)
        await log.start()
        try:
            return await body(log)
        finally:
            await log.close()

    return asyncio.run(main())


def write_calls(db: Database, settings: Settings, num_calls: int, **call: Any) -> None:
    """Append `num_calls` calls one after another (one commit each)."""

    async def body(log: AuditLog) -> None:
        for _ in range(num_calls):
            await log.append(*make_call(**call))

    with_log(db, settings, body)
