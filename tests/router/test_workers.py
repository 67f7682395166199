"""Engine workers on loopback: real `--role engine` processes on the bundled model, started,
killed, restarted and stopped by the supervisor; the worker's token check; the CLI's refusals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI

from aicc.cli.main import main
from aicc.config import Settings, load_settings
from aicc.errors import EngineUnavailableError
from aicc.router.remote import RemoteClient, RemoteUpstream
from aicc.router.worker_app import TENANT_HEADER
from aicc.router.worker_spec import WORKER_TOKEN_ENV, decode_worker_spec, encode_worker_spec
from aicc.router.workers import (
    WorkerReplica,
    WorkerState,
    WorkerSupervisor,
    restart_delay_s,
    running_workers,
)
from aicc.store.local import BUNDLED_MODEL_NAME, LocalModel, ensure_bundled

TOKEN = "worker-token-0123456789abcdefghijklmnopqrstuvwxyz"
T = TypeVar("T")


class LoopThread:
    """An event loop in a thread: the supervisor lives on it across the module's tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def worker_settings(model_dir: Path, **overrides: Any) -> Settings:
    return load_settings(
        model=BUNDLED_MODEL_NAME, model_dir=model_dir, max_batch_size=2, ctx_size=1024,
        log_level="warning", state_dir=model_dir.parent / "worker-state", **overrides,
    )  # fmt: skip


def is_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a container's init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class Workers:
    def __init__(self, loop: LoopThread, supervisor: WorkerSupervisor) -> None:
        self.loop = loop
        self.supervisor = supervisor
        self.changes: list[WorkerReplica] = []
        supervisor.on_change(self.changes.append)

    def replica(self, replica_id: str) -> WorkerReplica:
        return next(r for r in self.supervisor.replicas() if r.id == replica_id)

    def complete(self, upstream: RemoteUpstream) -> tuple[int, dict[str, Any]]:
        async def go() -> tuple[int, dict[str, Any]]:
            client = RemoteClient(upstream)
            try:
                body = {"model": BUNDLED_MODEL_NAME, "prompt": "One, two,", "max_tokens": 3}
                response = await client.open("/v1/completions", body)
                return response.status, await response.json()
            finally:
                await client.aclose()

        return self.loop.run(go())


@pytest.fixture(scope="module")
def workers(model_dir: Path) -> Iterator[Workers]:
    """Two workers as `aicc serve --workers 2 --threads 2` starts them in its lifespan."""
    loop = LoopThread()
    app = FastAPI()
    running = running_workers(app, worker_settings(model_dir, threads=2, workers=2))
    loop.run(running.__aenter__())
    try:
        yield Workers(loop, app.state.workers)
    finally:
        loop.run(running.__aexit__(None, None, None))
        assert app.state.workers is None
        loop.close()


def test_both_workers_start_ready_on_their_own_ports(workers: Workers) -> None:
    replicas = workers.supervisor.replicas()
    assert [r.id for r in replicas] == ["worker-0", "worker-1"]
    assert all(r.state is WorkerState.READY for r in replicas)
    assert len({r.url for r in replicas}) == 2
    assert all(r.url.startswith("http://127.0.0.1:") for r in replicas)
    assert all(r.pid is not None and is_running(r.pid) for r in replicas)
    assert workers.supervisor.num_ready == 2
    assert workers.supervisor.threads_per_worker == 1  # threads split between the two
    for replica in replicas:
        assert httpx.get(replica.url + "/readyz").json()["status"] == "ready"


def test_completion_with_the_token_and_401_without(workers: Workers) -> None:
    for replica in workers.supervisor.replicas():
        status, answer = workers.complete(workers.supervisor.upstream(replica.id))
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["model"] == BUNDLED_MODEL_NAME
        for key in (None, TOKEN, workers.supervisor.token[:-1]):
            status, answer = workers.complete(RemoteUpstream(replica.url, key))
            assert status == 401
            assert answer["error"]["type"] == "authentication_error"


def test_worker_serves_engine_routes_only(workers: Workers) -> None:
    url = workers.supervisor.replicas()[0].url
    auth = {"Authorization": f"Bearer {workers.supervisor.token}"}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        models = client.get("/v1/models", headers=auth).json()
        assert [card["id"] for card in models["data"]] == [BUNDLED_MODEL_NAME]
        assert client.get("/v1/models").status_code == 401
        metrics = client.get("/metrics", headers=auth)
        assert metrics.status_code == 200
        assert "aicc_" in metrics.text
        assert client.get("/metrics").status_code == 401
        tokens = client.post("/tokenize", json={"content": "hello"}, headers=auth)
        assert tokens.status_code == 200
        assert tokens.json()["tokens"]
        embedded = client.post(
            "/v1/embeddings", json={"model": BUNDLED_MODEL_NAME, "input": "hi"}, headers=auth
        )
        assert embedded.status_code == 200
        # No users, keys or audit of its own.
        assert client.get("/admin/users", headers=auth).status_code == 404
        assert client.post("/auth/login", json={}).status_code == 404


def test_tenant_header_is_checked(workers: Workers) -> None:
    url = workers.supervisor.replicas()[0].url
    body = {"model": BUNDLED_MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
    with httpx.Client(base_url=url, timeout=30) as client:
        for tenant, status in (("user:42", 200), ("user:x", 400), ("admin", 400)):
            headers = {"Authorization": f"Bearer {workers.supervisor.token}", TENANT_HEADER: tenant}
            response = client.post("/v1/completions", json=body, headers=headers)
            assert response.status_code == status, (tenant, response.text)
        assert TENANT_HEADER in response.json()["error"]["message"]


def test_killed_worker_is_reported_down_at_once_and_restarted(workers: Workers) -> None:
    victim = workers.replica("worker-0")
    other = workers.replica("worker-1")
    assert victim.pid is not None
    workers.changes.clear()
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def reported_down() -> bool:
        return any(c.id == victim.id and c.state is WorkerState.DOWN for c in workers.changes)

    wait_until(reported_down, 1.0, "the callback reports the killed worker down")
    assert time.monotonic() - killed_at < 1.0
    wait_until(lambda: workers.replica(victim.id).is_ready, 15.0, "the worker is ready again")
    restarted = workers.replica(victim.id)
    assert restarted.pid != victim.pid
    assert restarted.num_restarts == 1
    assert restarted.url == victim.url  # same socket: the router's address stays valid
    assert [c.state for c in workers.changes if c.id == victim.id] == [
        WorkerState.DOWN, WorkerState.STARTING, WorkerState.READY,
    ]  # fmt: skip
    assert workers.replica(other.id) == other  # untouched
    status, _ = workers.complete(workers.supervisor.upstream(victim.id))
    assert status == 200


def test_close_stops_every_worker(workers: Workers) -> None:
    # Runs last of the module's worker tests: it closes the shared supervisor.
    pids = [r.pid for r in workers.supervisor.replicas() if r.pid is not None]
    assert len(pids) == 2
    workers.loop.run(workers.supervisor.close())
    assert all(r.state is WorkerState.STOPPED for r in workers.supervisor.replicas())
    assert not any(is_running(pid) for pid in pids)
    with pytest.raises(httpx.ConnectError):  # the ports are released
        httpx.get(workers.supervisor.replicas()[0].url + "/healthz", timeout=5)


def test_worker_stops_when_its_gateway_is_killed(model_dir: Path) -> None:
    gateway_code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from aicc.config import load_settings\n"
        "from aicc.store.local import ensure_bundled\n"
        "from aicc.router.workers import WorkerSupervisor\n"
        "async def main():\n"
        "    model_dir = Path(sys.argv[1])\n"
        "    settings = load_settings(model='gemma-3-270m-q4_k_m', model_dir=model_dir,\n"
        "        max_batch_size=2, ctx_size=1024, threads=1, log_level='warning')\n"
        f"    supervisor = WorkerSupervisor(settings, ensure_bundled(model_dir), 1, 1, {TOKEN!r})\n"
        "    await supervisor.start()\n"
        "    print(supervisor.replicas()[0].pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    gateway = subprocess.Popen(
        [sys.executable, "-c", gateway_code, str(model_dir)], stdout=subprocess.PIPE, text=True
    )
    worker_pid = None
    try:
        assert gateway.stdout is not None
        worker_pid = int(gateway.stdout.readline())
        assert is_running(worker_pid)
        gateway.kill()
        gateway.wait()
        wait_until(lambda: not is_running(worker_pid), 15.0, "the orphaned worker exits")
    finally:
        gateway.kill()
        gateway.wait()
        if gateway.stdout is not None:
            gateway.stdout.close()
        if worker_pid is not None and is_running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_a_worker_that_cannot_load_its_model_fails_start_clearly(
    model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    settings = worker_settings(model_dir, threads=1)
    supervisor = WorkerSupervisor(settings, LocalModel("broken", broken, False), 1, 1, TOKEN)
    started = time.monotonic()
    with pytest.raises(
        EngineUnavailableError,
        match=r"worker-0 \(pid \d+\) exited with status 2 before it was ready",
    ):
        asyncio.run(supervisor.start())
    assert time.monotonic() - started < 30
    replica = supervisor.replicas()[0]
    assert replica.state is WorkerState.STOPPED
    assert replica.pid is not None
    assert not is_running(replica.pid)


def test_spec_carries_engine_settings_but_no_secrets(model_dir: Path) -> None:
    settings = worker_settings(
        model_dir, threads=8, workers=4, secret_key="s" * 40, admin_key="aicc-sk-" + "k" * 40,
        host="0.0.0.0", port=9000,
    )  # fmt: skip
    model = ensure_bundled(model_dir)
    line = encode_worker_spec(settings, model, threads=2)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    text = line.decode()
    assert "s" * 40 not in text
    assert "k" * 40 not in text
    assert "secret_key" not in json.loads(text)["settings"]
    decoded, decoded_model = decode_worker_spec(line)
    assert (decoded.role, decoded.workers, decoded.threads) == ("engine", 0, 2)
    assert (decoded.host, decoded.ctx_size, decoded.max_batch_size) == ("127.0.0.1", 1024, 2)
    assert decoded_model == model


def test_no_workers_means_none_are_started(model_dir: Path) -> None:
    async def go() -> None:
        app = FastAPI()
        async with running_workers(app, worker_settings(model_dir, workers=0)):
            assert app.state.workers is None

    asyncio.run(go())


def test_restart_backoff_doubles_up_to_the_cap() -> None:
    delays = [restart_delay_s(n, 1.0, 30.0) for n in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert restart_delay_s(10_000, 1.0, 30.0) == 30.0


def test_supervisor_refuses_nonsense_arguments(model_dir: Path) -> None:
    settings = worker_settings(model_dir)
    model = LocalModel("m", model_dir / "m.gguf", False)
    for count, threads, token in ((0, 1, TOKEN), (1, 0, TOKEN), (1, 1, ""), (1, 1, "short")):
        with pytest.raises(ValueError, match="count"):
            WorkerSupervisor(settings, model, count, threads, token)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--host", "0.0.0.0"], {WORKER_TOKEN_ENV: TOKEN}, "loopback only"),
        (["--host", "10.1.2.3"], {WORKER_TOKEN_ENV: TOKEN}, "host=10.1.2.3"),
        (["--host", "example.org"], {WORKER_TOKEN_ENV: TOKEN}, "loopback only"),
        ([], {}, WORKER_TOKEN_ENV),
        ([], {WORKER_TOKEN_ENV: "short"}, "32 to 512"),
        (["--workers", "2"], {WORKER_TOKEN_ENV: TOKEN}, "needs role gateway"),
    ],
)
def test_role_engine_refuses_unsafe_start(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    env = {WORKER_TOKEN_ENV: "", "AICC_MODEL_DIR": str(tmp_path), **env}
    result = CliRunner(env=env).invoke(main, ["serve", "--role", "engine", *args])
    assert result.exit_code == 2, result.output
    assert "aicc: error:" in result.stderr
    assert message in result.stderr
