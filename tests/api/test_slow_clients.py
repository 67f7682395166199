"""Slow and oversized clients at the HTTP edge, over raw sockets against the server that
`aicc serve` runs (`create_app` + `uvicorn_config`), plain HTTP and TLS."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from aicc.api.app import create_app
from aicc.config import Settings, load_settings
from aicc.edge import GuardedHttpProtocol
from aicc.errors import ConfigError
from aicc.store.local import BUNDLED_MODEL_NAME
from aicc.tls import init_certs, uvicorn_config
from tests.conftest import ADMIN_KEY

HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
KEEP_ALIVE_S = 2.0
MAX_HEADER_BYTES = 4096
MAX_CONNECTIONS = 64
PARTIAL_HEADERS = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: aicc\r\n"
    b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\nContent-Type: application"
)


class EdgeServer:
    """`app` served by uvicorn as `aicc serve` configures it, in a thread of this process."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        config = uvicorn_config(app, settings, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="edge-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port: int = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    @property
    def num_connections(self) -> int:
        return len(self.server.server_state.connections)

    @property
    def num_requests_in_app(self) -> int:
        return len(self.server.server_state.tasks)


@pytest.fixture(scope="module")
def edge(model_dir: Path) -> Iterator[EdgeServer]:
    settings = load_settings(
        model=BUNDLED_MODEL_NAME,
        model_dir=model_dir,
        state_dir=Path(tempfile.mkdtemp(dir=model_dir.parent, prefix="state-")),
        admin_key=ADMIN_KEY,
        max_batch_size=2,
        ctx_size=1024,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        keep_alive_s=KEEP_ALIVE_S,
        max_header_bytes=MAX_HEADER_BYTES,
        max_connections=MAX_CONNECTIONS,
    )
    server = EdgeServer(create_app(settings), settings)
    yield server
    server.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket, timeout_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    raise AssertionError(f"the server kept the connection open; received {data!r}")


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length, head
    while len(body) < int(length.group(1)):
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), body


def error_code(response: bytes) -> str:
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    code: str = body["error"]["code"]
    return code


def assert_engine_idle(edge: EdgeServer) -> None:
    stats = edge.app.state.engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)


def test_stalled_headers_get_408_and_never_reach_the_app(edge: EdgeServer) -> None:
    with connect(edge.port) as sock:
        start = time.monotonic()
        sock.sendall(PARTIAL_HEADERS)
        time.sleep(HEADER_TIMEOUT_S / 2)
        assert edge.num_requests_in_app == 0
        assert_engine_idle(edge)
        response, closed_at = read_until_closed(sock)
    assert HEADER_TIMEOUT_S * 0.9 <= closed_at - start < HEADER_TIMEOUT_S + 1.5
    assert response.startswith(b"HTTP/1.1 408 ")
    assert error_code(response) == "request_timeout"
    assert edge.num_requests_in_app == 0


def test_trickled_headers_are_cut_off_at_the_same_deadline(edge: EdgeServer) -> None:
    with connect(edge.port) as sock:
        start = time.monotonic()
        for byte in PARTIAL_HEADERS:
            if select.select([sock], [], [], 0.05)[0]:  # answered (408) or closed
                break
            sock.sendall(bytes([byte]))
        else:
            pytest.fail("the trickling client was never cut off")
        _, closed_at = read_until_closed(sock)
    assert closed_at - start < HEADER_TIMEOUT_S + 1.5
    assert edge.num_requests_in_app == 0


@pytest.mark.parametrize("start_of_request", [b"GET /healthz HTTP/1.1\r\nHo", b"\r\n"])
def test_slow_second_request_on_a_kept_alive_connection_gets_408(
    edge: EdgeServer, start_of_request: bytes
) -> None:
    with connect(edge.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: aicc\r\n\r\n")
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        # Bytes end uvicorn's keep-alive wait, even a blank line the parser skips.
        sock.sendall(start_of_request)
        response, closed_at = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 408 ")
    assert HEADER_TIMEOUT_S * 0.9 <= closed_at - start < HEADER_TIMEOUT_S + 1.0


def test_silent_connection_is_closed_after_the_header_timeout(edge: EdgeServer) -> None:
    with connect(edge.port) as sock:
        start = time.monotonic()
        response, closed_at = read_until_closed(sock)
    assert HEADER_TIMEOUT_S * 0.9 <= closed_at - start < HEADER_TIMEOUT_S + 1.5
    assert response.startswith(b"HTTP/1.1 408 ")


def test_stalled_body_gets_408_before_any_route_runs(edge: EdgeServer) -> None:
    with connect(edge.port) as sock:
        start = time.monotonic()
        sock.sendall(PARTIAL_HEADERS + b"/json\r\nContent-Length: 100\r\n\r\n" + b'{"model": ')
        time.sleep(BODY_TIMEOUT_S / 2)
        assert_engine_idle(edge)
        response, closed_at = read_until_closed(sock)
    assert BODY_TIMEOUT_S * 0.9 <= closed_at - start < BODY_TIMEOUT_S + 1.5
    assert response.startswith(b"HTTP/1.1 408 ")
    assert error_code(response) == "request_timeout"
    assert_engine_idle(edge)


@pytest.mark.parametrize("shape", ["one header", "endless header line"])
def test_oversized_headers_get_431(edge: EdgeServer, shape: str) -> None:
    with connect(edge.port) as sock:
        if shape == "one header":
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        else:  # never ends: only the raw byte count can catch it
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: ")
            for _ in range(5):
                sock.sendall(b"a" * 1000)
                time.sleep(0.02)
        start = time.monotonic()
        response, closed_at = read_until_closed(sock)
    assert closed_at - start < HEADER_TIMEOUT_S  # refused at once, not timed out
    assert response.startswith(b"HTTP/1.1 431 ")
    assert error_code(response) == "request_header_fields_too_large"


def test_body_sent_after_an_early_413_is_not_taken_for_headers(edge: EdgeServer) -> None:
    size = 4 * 1024 * 1024 + 1  # over the default max_body_bytes
    with connect(edge.port) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: aicc\r\n")
        sock.sendall(b"Content-Length: %d\r\n\r\n" % size)
        assert read_response(sock)[0] == 413
        sock.sendall(b"x" * size)  # the client sends its body anyway, then another request
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: aicc\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_pipelined_requests_with_a_large_body_are_all_answered(edge: EdgeServer) -> None:
    body = b"b" * (MAX_HEADER_BYTES * 10)
    first = b"POST /healthz HTTP/1.1\r\nHost: aicc\r\nContent-Length: %d\r\n\r\n" % len(body)
    second = b"GET /healthz HTTP/1.1\r\nHost: aicc\r\n\r\n"
    with connect(edge.port) as sock:
        sock.sendall(first + body + second + second)  # one write: the body is not headers
        # The three responses may arrive in one segment: read them as a stream.
        data = b""
        while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b'{"status":"ok"}'):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [405, 200, 200]


def test_keep_alive_outlasts_the_header_timeout_and_then_ends(edge: EdgeServer) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: aicc\r\nX-Pad: " + b"p" * 3000 + b"\r\n\r\n"
    with connect(edge.port) as sock:
        sock.sendall(request)
        assert read_response(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT_S * 2)  # idle on keep-alive: not a slow request
        sock.sendall(request)
        assert read_response(sock)[0] == 200
        start = time.monotonic()
        response, closed_at = read_until_closed(sock, timeout_s=KEEP_ALIVE_S + 2)
    assert response == b""  # keep-alive expiry closes silently
    assert KEEP_ALIVE_S * 0.9 <= closed_at - start < KEEP_ALIVE_S + 1.5


def test_fifty_slowloris_connections_do_not_stop_a_normal_request(edge: EdgeServer) -> None:
    slow = [connect(edge.port) for _ in range(50)]
    try:
        for sock in slow:
            sock.sendall(PARTIAL_HEADERS)
        with httpx.Client(base_url=f"http://127.0.0.1:{edge.port}", timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            assert edge.num_connections >= 51  # served while all fifty are held open
            body = {
                "model": BUNDLED_MODEL_NAME,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            }
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        for sock in slow:
            assert read_until_closed(sock)[0].startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in slow:
            sock.close()


def test_connections_beyond_the_limit_get_503_until_idle_ones_are_cut(edge: EdgeServer) -> None:
    idle = [connect(edge.port) for _ in range(MAX_CONNECTIONS)]
    try:
        deadline = time.monotonic() + 5
        while edge.num_connections < MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{edge.port}", timeout=10) as client:
            refused = client.get("/healthz")
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            assert refused.json()["error"]["code"] == "server_overloaded"
            assert refused.json()["error"]["type"] == "server_error"
        time.sleep(HEADER_TIMEOUT_S + 0.3)
        with httpx.Client(base_url=f"http://127.0.0.1:{edge.port}", timeout=10) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        for sock in idle:
            sock.close()


# -- TLS, configuration, and the `aicc serve` process ----------------------------------------


async def _hello(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def test_header_timeout_works_over_tls(tmp_path: Path) -> None:
    certs = init_certs(tmp_path, hosts=[], days=1)
    settings = Settings(
        tls_cert=certs.server_cert, tls_key=certs.server_key, header_timeout_s=HEADER_TIMEOUT_S
    )
    server = EdgeServer(Starlette(routes=[Route("/", _hello)]), settings)
    context = ssl.create_default_context(cafile=certs.ca_cert)
    try:
        with (
            connect(server.port) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(tls) == (200, b"hello")
            start = time.monotonic()
            tls.sendall(b"GET / HTTP/1.1\r\nHost: loc")
            response, closed_at = read_until_closed(tls)
        assert response.startswith(b"HTTP/1.1 408 ")
        assert closed_at - start < HEADER_TIMEOUT_S + 1.5
    finally:
        server.stop()


def test_settings_reach_uvicorn_and_bad_values_are_named() -> None:
    settings = Settings(
        header_timeout_s=3, max_header_bytes=2048, max_connections=7, keep_alive_s=9
    )
    config = uvicorn_config(Starlette(), settings)
    config.load()
    protocol = config.http_protocol_class
    assert issubclass(protocol, GuardedHttpProtocol)
    assert (protocol.limits.timeout_s, protocol.limits.max_bytes) == (3, 2048)
    assert (config.limit_concurrency, config.timeout_keep_alive) == (7, 9)
    defaults = Settings()
    assert (defaults.header_timeout_s, defaults.body_timeout_s) == (10, 30)
    assert (defaults.max_header_bytes, defaults.max_connections) == (32 * 1024, 1024)
    with pytest.raises(ConfigError, match="header_timeout_s=0"):
        load_settings(header_timeout_s=0)


def test_aicc_serve_applies_the_edge_settings(model_dir: Path, tmp_path: Path) -> None:
    gguf = model_dir / f"{BUNDLED_MODEL_NAME}.gguf"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AICC_")}
    env |= {
        "AICC_STATE_DIR": str(tmp_path / "state"),
        "AICC_ADMIN_KEY": ADMIN_KEY,
        "AICC_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "AICC_MAX_HEADER_BYTES": "2048",
    }
    command = [sys.executable, "-m", "aicc", "serve", "--model-path", str(gguf), "--port", "0"]
    command += ["--max-batch-size", "1", "--ctx-size", "512"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert process.stdout is not None
        output = ""
        while (match := re.search(r"http://127\.0\.0\.1:(\d+)", output)) is None:
            line = process.stdout.readline()
            assert line, output
            output += line
        port = int(match.group(1))
        with connect(port) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: a")
            response, closed_at = read_until_closed(sock)
        assert response.startswith(b"HTTP/1.1 408 ")
        assert closed_at - start < HEADER_TIMEOUT_S + 1.5
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
            assert read_until_closed(sock)[0].startswith(b"HTTP/1.1 431 ")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        if process.stdout is not None:
            process.stdout.close()
