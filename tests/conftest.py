"""Session fixtures: the bundled model, and real aicc servers on loopback ports."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI

from aicc.api.app import create_app
from aicc.config import load_settings
from aicc.db import Database
from aicc.engine.interface import EngineClient
from aicc.router.service import Router
from aicc.router.workers import WorkerSupervisor
from aicc.store.local import BUNDLED_MODEL_NAME, ensure_bundled
from tests.fixtures.postgres import find_postgres_bin, postgres_server

ADMIN_KEY = "aicc-sk-TestAdminKey0123456789abcdefghijklmnopqrstu"
"""The bootstrap admin's key (roles admin + security) on every test server."""


class LiveServer:
    """aicc on 127.0.0.1, in a thread of the test process (so tests can read engine stats)."""

    api_key = ADMIN_KEY
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}  # noqa: RUF012 (read-only by use)

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    @property
    def base_url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    @property
    def engine(self) -> EngineClient:
        engine: EngineClient = self.app.state.engine
        return engine

    @property
    def router(self) -> Router:
        router: Router = self.app.state.router
        return router

    @property
    def workers(self) -> WorkerSupervisor:
        """The engine workers' supervisor (`workers: N`)."""
        supervisor: WorkerSupervisor = self.app.state.workers
        return supervisor

    def create_user_key(
        self, username: str, roles: tuple[str, ...] = ("user",), **key_fields: Any
    ) -> str:
        """A new user (if needed) holding `roles`, and a new API key of theirs."""
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30) as client:
            created = client.post("/admin/users", json={"username": username, "roles": roles})
            assert created.status_code in (201, 409), created.text
            body = {"user": username, "name": f"test-{username}", **key_fields}
            response = client.post("/admin/keys", json=body)
            assert response.status_code == 201, response.text
            key: str = response.json()["key"]
            return key

    def wait_until_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"engine still busy: {self.engine.stats()}")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    ensure_bundled(path)
    return path


def start_server(model_dir: Path, **overrides: Any) -> LiveServer:
    """A server with a state database of its own, in pytest's temp dir."""
    overrides.setdefault("state_dir", Path(tempfile.mkdtemp(dir=model_dir.parent, prefix="state-")))
    overrides.setdefault("admin_key", ADMIN_KEY)
    settings = load_settings(model=BUNDLED_MODEL_NAME, model_dir=model_dir, port=0, **overrides)
    return LiveServer(create_app(settings)).start()


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[LiveServer]:
    """The main test server: 16 slots, room for the 16-stream tests. Prefix caching is off:
    many tests compare two runs of a prompt token for token, and cached prefixes left in the
    unified KV cache change where a sequence's cells land, which changes the grouping of the
    attention sums (low-order bits, and at a near-tie a greedy token). `caching_server` has it."""
    live = start_server(model_dir, max_batch_size=16, ctx_size=4096, prefix_cache=False)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def caching_server(model_dir: Path) -> Iterator[LiveServer]:
    """Default settings (prefix caching on, per tenant) at a test-sized batch."""
    live = start_server(model_dir, max_batch_size=4, ctx_size=4096)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def deterministic_server(model_dir: Path) -> Iterator[LiveServer]:
    """Batch-invariant mode: 16 slots with a KV stream of 256 cells each."""
    live = start_server(model_dir, max_batch_size=16, ctx_size=4096, batch_invariant=True)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def tiny_server(model_dir: Path) -> Iterator[LiveServer]:
    """One slot, one queue place, a short deadline: for overload and timeout tests."""
    live = start_server(
        model_dir, max_batch_size=1, max_queue=1, ctx_size=1024, request_timeout_s=3.0
    )
    yield live
    live.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[str]:
    """One real PostgreSQL server for the session (Debian's package; `initdb` into a temp dir)."""
    if find_postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (scripts/install-test-deps.sh installs it)")
    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_cluster: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = postgres_cluster.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres_cluster.rsplit("/", 1)[0] + f"/{name}"


def migrated_database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A migrated, empty state database on the backend named by the fixture's param:
    "sqlite" (a file in `tmp_path`) or "postgresql" (a fresh database, `postgres_url`)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'state' / 'aicc.db'}"
    db = Database(url)
    db.migrate()
    return db
