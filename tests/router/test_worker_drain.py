"""An engine worker (`aicc serve --role engine`) drains on SIGTERM as the gateway does: the
stream in flight finishes, readiness and new requests get 503, then it exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aicc.router.worker_spec import WORKER_TOKEN_ENV
from aicc.store.local import BUNDLED_MODEL_NAME

TOKEN = "worker-token-0123456789abcdefghijklmnopqrstuvwxyz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sigterm_drains_the_worker(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        WORKER_TOKEN_ENV: TOKEN,
        "AICC_MODEL_DIR": str(model_dir),
        "AICC_STATE_DIR": str(tmp_path / "state"),
        "AICC_THREADS": "1",
        "AICC_CTX_SIZE": "1024",
        "AICC_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "aicc", "serve", "--role", "engine", "--port", str(port)]
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker did not become ready"
            time.sleep(0.1)
        body = {
            "model": BUNDLED_MODEL_NAME,
            "prompt": "Count from one to one hundred:",
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": True,
        }
        with (
            httpx.Client(base_url=base, headers=headers, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            worker.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the drain starts on the server's next tick (0.1 s)
            with httpx.Client(base_url=base, headers=headers, timeout=10) as other:
                assert other.get("/readyz").status_code == 503
                refused = other.post("/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "server_draining"
            assert refused.headers["retry-after"] == "1"
            rest = [line for line in lines if line.startswith("data: ")]
        assert first != "data: [DONE]"
        assert rest[-1] == "data: [DONE]"
        assert len(rest) >= 40  # the whole answer, not a cut one
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if worker.stderr is not None:
            worker.stderr.close()
