"""Graceful drain of a real `aicc serve` process: SIGTERM during live streams."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from aicc.api.app import create_app
from aicc.api.drain import DrainingServer
from aicc.audit.entries import AuditEntry
from aicc.audit.query import query
from aicc.config import load_settings
from aicc.db import Database
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import ADMIN_KEY

HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
NUM_STREAMS = 20
DRAIN_TIMEOUT_S = 60.0
STREAM_TOKENS = 16


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    state_dir: Path
    log: Path

    def audit_entries(self) -> list[AuditEntry]:
        db = Database(f"sqlite:///{self.state_dir / 'aicc.db'}")
        try:
            return [e for e in query(db, action="api.call", limit=10000)]
        finally:
            db.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            log = self.log.read_text()[-3000:]
            raise AssertionError(f"aicc serve did not exit:\n{log}") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_serve(model_dir: Path, drain_timeout_s: float, *flags: str) -> ServeProcess:
    state_dir = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix="drain-"))
    port = _free_port()
    env = {
        **os.environ,
        "AICC_ADMIN_KEY": ADMIN_KEY,
        "AICC_MODEL_DIR": str(model_dir),
        "AICC_DRAIN_TIMEOUT_S": str(drain_timeout_s),
        "AICC_LOG_LEVEL": "info",
    }
    command = [sys.executable, "-m", "aicc", "serve", "--port", str(port), "--threads", "1"]
    command += ["--state-dir", str(state_dir), *flags]
    log = state_dir / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = ServeProcess(process, f"http://127.0.0.1:{port}", state_dir, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(served.base_url + "/readyz", timeout=1).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise AssertionError(f"aicc serve did not become ready:\n{log.read_text()[-3000:]}")


@pytest.fixture
def serve_factory(model_dir: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


@dataclass
class StreamResult:
    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    request_id: str = ""
    events: list[str] = field(default_factory=list)
    error: BaseException | None = None


def _stream(base_url: str, max_tokens: int, result: StreamResult) -> None:
    body = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        url = base_url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=HEADERS, timeout=120) as response:
            result.status = response.status_code
            result.request_id = response.headers.get("x-request-id", "")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    result.events.append(line[6:])
                    result.started.set()
    except httpx.HTTPError as exc:
        result.error = exc
    finally:
        result.started.set()
        result.finished.set()


def _start_streams(base_url: str, num: int, max_tokens: int) -> list[StreamResult]:
    results = [StreamResult() for _ in range(num)]
    for result in results:
        threading.Thread(target=_stream, args=(base_url, max_tokens, result), daemon=True).start()
    for result in results:
        assert result.started.wait(60), "every stream started"
    assert all(r.status == 200 and r.error is None for r in results)
    assert all(r.events[-1:] != ["[DONE]"] for r in results), "all are live"
    return results


def _join(results: list[StreamResult]) -> None:
    for result in results:
        assert result.finished.wait(10), "the stream ended"


def test_sigterm_during_20_live_streams(serve_factory: list[ServeProcess], model_dir: Path) -> None:
    served = start_serve(model_dir, DRAIN_TIMEOUT_S)
    serve_factory.append(served)
    results = _start_streams(served.base_url, NUM_STREAMS, max_tokens=STREAM_TOKENS)
    signalled = time.monotonic()
    served.process.send_signal(signal.SIGTERM)

    ready = httpx.get(served.base_url + "/readyz", timeout=5)
    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    assert time.monotonic() - signalled < 1.0
    assert httpx.get(served.base_url + "/healthz", timeout=5).status_code == 200
    refused = httpx.post(
        served.base_url + "/v1/chat/completions",
        json={"model": BUNDLED_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]},
        headers=HEADERS,
        timeout=5,
    )
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert refused.json()["error"]["code"] == "server_draining"

    assert served.wait(DRAIN_TIMEOUT_S + 15) == 0
    _join(results)
    for result in results:
        assert result.error is None
        assert result.events[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in result.events[:-1]]
        assert finish[-1] == "length"
    entries = {e.request_id: e for e in served.audit_entries()}
    for result in results:
        entry = entries[result.request_id]
        assert entry.status == 200
        assert (entry.finish_reason, entry.completion_tokens) == ("length", STREAM_TOKENS)
    drained = entries[refused.headers["x-request-id"]]
    assert (drained.status, drained.error_code) == (503, "server_draining")
    log = served.log.read_text()
    assert "Traceback" not in log
    assert "draining: 20 requests in flight" in log


# -- the drain's ends, on a server in this process (signals simulated) ------------------------
class DrainingLiveServer:
    """`aicc`'s app under `DrainingServer` in a thread; `signal()` does what a signal does."""

    def __init__(self, model_dir: Path, drain_timeout_s: float) -> None:
        self.state_dir = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix="drain-"))
        settings = load_settings(
            model=BUNDLED_MODEL_NAME,
            model_dir=model_dir,
            state_dir=self.state_dir,
            admin_key=ADMIN_KEY,
            threads=1,
            max_batch_size=2,
            ctx_size=4096,
        )
        app = create_app(settings)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2
        )
        self.server = DrainingServer(config, app.state.drain, drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, name="draining", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive(), "the server failed to start"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.server.handle_exit(sig, None)

    def stop(self) -> None:
        self.server.should_exit = True  # uvicorn's plain shutdown, if a test left it running
        self.thread.join(timeout=30)

    def audit_entries(self) -> dict[str | None, AuditEntry]:
        db = Database(f"sqlite:///{self.state_dir / 'aicc.db'}")
        try:
            return {e.request_id: e for e in query(db, action="api.call", limit=10000)}
        finally:
            db.close()


@pytest.fixture
def draining_server(
    model_dir: Path, request: pytest.FixtureRequest
) -> Iterator[DrainingLiveServer]:
    """A server whose drain lasts at most `request.param` s (DRAIN_TIMEOUT_S by default)."""
    live = DrainingLiveServer(model_dir, getattr(request, "param", DRAIN_TIMEOUT_S))
    yield live
    live.stop()


@pytest.mark.parametrize("draining_server", [1.0], indirect=True)
def test_drain_timeout_cuts_what_is_left(
    draining_server: DrainingLiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    live = draining_server
    results = _start_streams(live.base_url, 2, max_tokens=2000)
    signalled = time.monotonic()
    live.signal()
    live.thread.join(timeout=30)
    assert not live.thread.is_alive()
    # 1 s of drain, at most 2 s for the cut calls to unwind, then the lifespan's end.
    assert time.monotonic() - signalled < 8
    _join(results)
    assert all(r.events[-1:] != ["[DONE]"] for r in results), "cut short"
    entries = live.audit_entries()
    assert all(entries[r.request_id].status == 499 for r in results), "the cut calls recorded"
    assert "ending the drain (drain timeout): cancelling 2 requests" in caplog.text


def test_a_second_signal_ends_the_drain_at_once(
    draining_server: DrainingLiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    live = draining_server
    results = _start_streams(live.base_url, 1, max_tokens=2000)
    live.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(live.base_url + "/readyz", timeout=5).status_code == 503
    assert live.thread.is_alive(), "draining, waiting for the stream"
    signalled = time.monotonic()
    live.signal(signal.SIGINT)
    live.thread.join(timeout=30)
    assert time.monotonic() - signalled < 8
    _join(results)
    assert live.audit_entries()[results[0].request_id].status == 499
    assert "ending the drain (second signal)" in caplog.text


def test_an_idle_server_stops_at_once(
    draining_server: DrainingLiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aicc.api.drain")
    live = draining_server
    signalled = time.monotonic()
    live.signal()
    live.thread.join(timeout=30)
    assert not live.thread.is_alive()
    assert time.monotonic() - signalled < 3
    assert "drained: no request left in flight" in caplog.text
