"""Every call leaves exactly one audit entry with the right fields; a `kill -9` right after a
200 loses nothing; the log verifies."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from aicc.audit import verify
from aicc.audit.entries import AuditEntry, ContentCipher
from aicc.audit.query import query
from aicc.auth.tokens import load_server_secret
from aicc.config import load_settings
from aicc.db import Database
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import ADMIN_KEY, LiveServer, start_server

CHAT = {"model": BUNDLED_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}


def _entry(server: LiveServer, request_id: str) -> AuditEntry:
    """The one entry of `request_id` (the writer commits before the response ends)."""
    db = server.app.state.audit.db
    found = [e for e in query(db, limit=1000) if e.request_id == request_id]
    assert len(found) == 1, found
    return found[0]


def _post(server: LiveServer, path: str, body: dict[str, object], **headers: str) -> httpx.Response:
    content = json.dumps(body).encode()
    return httpx.post(
        server.base_url + path,
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=60,
    )


def test_inference_calls_are_recorded_with_principal_model_and_tokens(server: LiveServer) -> None:
    key = server.create_user_key("audit-trail-user")
    body = {**CHAT, "max_tokens": 3}
    response = _post(server, "/v1/chat/completions", body, **{"x-api-key": key})
    assert response.status_code == 200
    entry = _entry(server, response.headers["x-request-id"])
    usage = response.json()["usage"]
    assert entry.action == "api.call"
    assert (entry.method, entry.route, entry.status) == ("POST", "/v1/chat/completions", 200)
    assert entry.username == "audit-trail-user"
    assert entry.key_id is not None
    assert entry.key_id.startswith("key_")
    assert entry.roles == ("user",)
    assert entry.model == BUNDLED_MODEL_NAME
    assert entry.prompt_tokens == usage["prompt_tokens"]
    assert entry.completion_tokens == usage["completion_tokens"]
    assert entry.finish_reason == "length"
    assert entry.client_addr == "127.0.0.1"
    assert entry.body_sha256 == hashlib.sha256(json.dumps(body).encode()).hexdigest()
    assert entry.latency_ms is not None
    assert entry.latency_ms > 0


def test_streams_embeddings_and_lists_each_leave_one_entry(server: LiveServer) -> None:
    request_id = "audit-stream-0001"
    with openai.OpenAI(
        base_url=server.base_url + "/v1",
        api_key=ADMIN_KEY,
        max_retries=0,
        default_headers={"X-Request-ID": request_id},
    ) as client:
        chunks = client.chat.completions.create(**CHAT, max_tokens=4, stream=True)  # type: ignore[call-overload]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text
    entry = _entry(server, request_id)
    assert (entry.status, entry.username, entry.completion_tokens) == (200, "admin", 4)
    embed = _post(server, "/v1/embeddings", {"model": BUNDLED_MODEL_NAME, "input": "x"},
                  Authorization=f"Bearer {ADMIN_KEY}")  # fmt: skip
    assert _entry(server, embed.headers["x-request-id"]).prompt_tokens == 1 + 1
    listed = httpx.get(server.base_url + "/v1/models", headers=server.headers)
    assert _entry(server, listed.headers["x-request-id"]).route == "/v1/models"


def test_denials_refusals_and_admin_changes_are_recorded(server: LiveServer) -> None:
    denied = httpx.get(server.base_url + "/v1/models", headers={"x-api-key": "aicc-sk-" + "n" * 43})
    entry = _entry(server, denied.headers["x-request-id"])
    assert (entry.status, entry.username, entry.error_code) == (401, None, "invalid_api_key")

    key = server.create_user_key("audit-limited", rpm=1)
    first = _post(server, "/v1/completions", {"model": BUNDLED_MODEL_NAME, "prompt": "a",
                  "max_tokens": 1}, **{"x-api-key": key})  # fmt: skip
    assert first.status_code == 200
    limited = _post(server, "/v1/completions", {"model": BUNDLED_MODEL_NAME, "prompt": "a"},
                    **{"x-api-key": key})  # fmt: skip
    entry = _entry(server, limited.headers["x-request-id"])
    assert (entry.status, entry.error_code) == (429, "rate_limit_exceeded")

    body = {"username": "audit-created", "password": "Audit-Passw0rd-1", "roles": ["user"]}
    created = _post(server, "/admin/users", body, Authorization=f"Bearer {ADMIN_KEY}")
    assert created.status_code == 201
    entry = _entry(server, created.headers["x-request-id"])
    assert (entry.route, entry.username) == ("/admin/users", "admin")
    assert entry.detail is not None
    assert entry.detail["request"]["username"] == "audit-created"
    assert entry.detail["request"]["password"] == "***"
    login = _post(server, "/auth/login", {"username": "audit-created", "password": "wrong-Pw-1"})
    entry = _entry(server, login.headers["x-request-id"])
    assert (entry.status, entry.detail) == (401, {"username": "audit-created"})
    assert "wrong-Pw-1" not in json.dumps(entry.to_json())


def test_probes_are_not_audited(server: LiveServer) -> None:
    response = httpx.get(server.base_url + "/healthz")
    db = server.app.state.audit.db
    assert all(e.request_id != response.headers["x-request-id"] for e in query(db, limit=1000))


def test_kill_9_after_a_200_loses_no_entry(model_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "AICC_ADMIN_KEY": ADMIN_KEY, "AICC_STATE_DIR": str(state),
           "AICC_LOG_FORMAT": "text"}  # fmt: skip
    gguf = model_dir / f"{BUNDLED_MODEL_NAME}.gguf"
    process = subprocess.Popen(
        [sys.executable, "-m", "aicc", "serve", "--model-path", str(gguf), "--port", "0",
         "--max-batch-size", "2", "--ctx-size", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    request_ids = []
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 120
        while "python -c" not in banner and time.monotonic() < deadline:
            banner += process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for index in range(3):
            response = httpx.post(
                match.group(0) + "/v1/completions",
                json={"model": BUNDLED_MODEL_NAME, "prompt": f"n{index}", "max_tokens": 1},
                headers={**headers, "X-Request-ID": f"kill9-{index}"},
                timeout=60,
            )
            assert response.status_code == 200
            request_ids.append(response.headers["x-request-id"])
        process.send_signal(signal.SIGKILL)  # right after the last 200
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        if process.stdout is not None:
            process.stdout.close()
    settings = load_settings(state_dir=state)
    db = Database(settings.resolved_database_url)
    try:
        logged = {e.request_id for e in query(db, limit=1000)}
        assert set(request_ids) <= logged
        report = verify(db, state / "audit-checkpoints.jsonl", load_server_secret(settings))
        assert report.ok, report
    finally:
        db.close()


def test_captured_content_is_stored_encrypted(model_dir: Path, tmp_path: Path) -> None:
    key = bytes(range(32))
    key_file = tmp_path / "content.key"
    key_file.write_text(key.hex())
    key_file.chmod(0o600)
    live = start_server(
        model_dir,
        max_batch_size=1,
        ctx_size=512,
        audit_capture_content=True,
        audit_content_key_file=key_file,
    )
    try:
        marker = "CAPTURE-MARKER-51"
        body = {**CHAT, "messages": [{"role": "user", "content": marker}], "max_tokens": 3}
        response = _post(live, "/v1/chat/completions", body, Authorization=f"Bearer {ADMIN_KEY}")
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        entry = _entry(live, request_id)
        assert entry.prompt_enc is not None
        assert entry.completion_enc is not None
        assert marker not in entry.prompt_enc
        cipher = ContentCipher(key)
        assert marker in cipher.open(entry.prompt_enc, request_id, "prompt")
        answer = response.json()["choices"][0]["message"]["content"]
        assert cipher.open(entry.completion_enc, request_id, "completion") == answer
    finally:
        live.stop()
