"""The log handler's two formats, the access line, and — against a live server — that uvicorn's
records come through ours and no credential, password or prompt is ever written."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from aicc.api.app import create_app
from aicc.api.record import CallOutcome, CallRecord
from aicc.auth.principal import Limits, Principal
from aicc.config import load_settings
from aicc.observability.logging import (
    configure_logging,
    log_call,
    request_context,
    uvicorn_logging_options,
)
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import ADMIN_KEY

_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.asgi", "uvicorn.access", "aicc.access")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Where configure_logging writes in a test; the logging state is restored afterwards."""
    saved = {
        name: (
            list(logging.getLogger(name).handlers),
            logging.getLogger(name).level,
            logging.getLogger(name).propagate,
            logging.getLogger(name).disabled,
        )
        for name in _LOGGERS
    }
    yield io.StringIO()
    for name, (handlers, level, propagate, disabled) in saved.items():
        target = logging.getLogger(name)
        target.handlers[:] = handlers
        target.setLevel(level)
        target.propagate = propagate
        target.disabled = disabled


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def _principal() -> Principal:
    return Principal(
        user_id=7,
        username="alice",
        roles=("user",),
        permissions=frozenset(),
        models=("*",),
        via="key",
        credential_id="key_0123456789ab",
        user_limits=Limits(),
    )


def _call(status: int = 200) -> tuple[CallRecord, CallOutcome]:
    record = CallRecord("req-1", principal=_principal(), model="gemma", num_prompt_tokens=12)
    record.num_completion_tokens = 5
    record.finish_reason = "stop"
    record.prompt_text = "my secret prompt"
    outcome = CallOutcome(
        method="POST",
        route="/v1/chat/completions",
        path="/v1/chat/completions",
        status=status,
        latency_s=0.25,
        client_addr="127.0.0.1",
        body_sha256="ab" * 32,
    )
    return record, outcome


def test_json_access_line_has_the_documented_shape(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    log_call(*_call())
    (line,) = _lines(log_stream)
    assert line["@timestamp"].endswith("Z")
    assert line["log.level"] == "info"
    assert line["log.logger"] == "aicc.access"
    assert line["message"] == "POST /v1/chat/completions 200 250.0ms"
    assert line["http.request.id"] == "req-1"
    assert line["http.request.method"] == "POST"
    assert line["http.route"] == "/v1/chat/completions"
    assert line["http.response.status_code"] == 200
    assert line["event.duration"] == 250_000_000
    assert line["user.name"] == "alice"
    assert line["user.roles"] == ["user"]
    assert line["aicc.key_id"] == "key_0123456789ab"
    assert line["aicc.model"] == "gemma"
    assert (line["aicc.prompt_tokens"], line["aicc.completion_tokens"]) == (12, 5)
    assert "my secret prompt" not in log_stream.getvalue()
    assert "aicc.ttft_ms" not in line  # absent values are left out, not null


def test_server_errors_are_logged_at_error(log_stream: io.StringIO) -> None:
    configure_logging("warning", "json", stream=log_stream)
    log_call(*_call(status=200))  # INFO: below the level
    log_call(*_call(status=503))
    (line,) = _lines(log_stream)
    assert (line["log.level"], line["http.response.status_code"]) == ("error", 503)


def test_exceptions_carry_their_stack_trace(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("aicc.test").exception("it failed")
    (line,) = _lines(log_stream)
    assert (line["error.type"], line["error.message"]) == ("RuntimeError", "boom")
    assert "Traceback" in line["error.stack_trace"]
    assert "raise RuntimeError" in line["error.stack_trace"]


def test_lines_inside_a_request_carry_its_id(log_stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=log_stream)
    with request_context("abc-123"):
        logging.getLogger("aicc.test").warning("inside")
    logging.getLogger("aicc.test").warning("outside")
    inside, outside = _lines(log_stream)
    assert inside["http.request.id"] == "abc-123"
    assert "http.request.id" not in outside


def test_configuring_twice_keeps_one_handler(log_stream: io.StringIO) -> None:
    configure_logging("info", "text", stream=io.StringIO())
    configure_logging("info", "json", stream=log_stream)
    logging.getLogger("aicc.test").info("once")
    assert [line["message"] for line in _lines(log_stream)] == ["once"]


def test_text_format_is_for_people(log_stream: io.StringIO) -> None:
    configure_logging("info", "text", stream=log_stream)
    log_call(*_call())
    text = log_stream.getvalue().strip()
    assert "INFO" in text
    assert "aicc.access: POST /v1/chat/completions 200 250.0ms" in text
    assert "user=alice" in text
    assert "request_id=req-1" in text
    assert not text.startswith("{")


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="loud"):
        configure_logging("loud", "json", stream=io.StringIO())


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_tokens_in_messages_are_redacted(log_stream: io.StringIO, fmt: Any) -> None:
    configure_logging("info", fmt, stream=log_stream)
    session = "aicc-st-" + "S" * 43
    logging.getLogger("aicc.test").warning("key %s header Bearer abc.def-123", ADMIN_KEY)
    try:
        raise ValueError(f"bad token {session}")
    except ValueError:
        logging.getLogger("aicc.test").exception("failed")
    text = log_stream.getvalue()
    assert ADMIN_KEY not in text
    assert session not in text
    assert "abc.def-123" not in text
    assert "aicc-sk-[REDACTED]" in text


def test_uvicorn_records_come_through_ours_without_its_access_log(
    log_stream: io.StringIO,
) -> None:
    configure_logging("info", "json", stream=log_stream)
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    (line,) = _lines(log_stream)
    assert (line["log.logger"], line["message"]) == ("uvicorn.error", "Started server process")


def test_live_server_logs_calls_but_never_secrets(log_stream: io.StringIO, model_dir: Path) -> None:
    """A real server: key calls, a denied key, a wrong password, a chat with a marked prompt.
    Every line is JSON, calls have access lines, and none of the secrets appear anywhere."""
    configure_logging("info", "json", stream=log_stream)
    settings = load_settings(
        model=BUNDLED_MODEL_NAME,
        model_dir=model_dir,
        port=0,
        max_batch_size=1,
        ctx_size=512,
        admin_key=ADMIN_KEY,
        state_dir=Path(tempfile.mkdtemp(dir=model_dir.parent, prefix="state-")),
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, **uvicorn_logging_options())
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive(), "the server failed to start"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        wrong_key = "aicc-sk-" + "W" * 43
        password = "Correct-Horse-Battery-9"
        prompt = "PROMPT-MARKER-7f3a"
        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "X-Request-ID": "live-req-1"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.get("/v1/models", headers=headers).status_code == 200
            denied = client.get("/v1/models", headers={"Authorization": f"Bearer {wrong_key}"})
            assert denied.status_code == 401
            login = client.post("/auth/login", json={"username": "admin", "password": password})
            assert login.status_code in (400, 401)
            chat = client.post(
                "/v1/chat/completions",
                headers=headers,
                json={
                    "model": BUNDLED_MODEL_NAME,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 4,
                },
            )
            assert chat.status_code == 200, chat.text
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    text = log_stream.getvalue()
    lines = _lines(log_stream)  # every line parses
    for secret in (ADMIN_KEY, wrong_key, password, prompt):
        assert secret not in text
    access = [line for line in lines if line["log.logger"] == "aicc.access"]
    statuses = {(line["url.path"], line["http.response.status_code"]) for line in access}
    assert {("/v1/models", 200), ("/v1/models", 401), ("/v1/chat/completions", 200)} <= statuses
    (models_ok,) = [
        line
        for line in access
        if line["url.path"] == "/v1/models" and line["http.response.status_code"] == 200
    ]
    assert models_ok["http.request.id"] == "live-req-1"  # the client's X-Request-ID
    assert models_ok["user.name"] == "admin"
    assert models_ok["http.route"] == "/v1/models"
    assert any(line["log.logger"].startswith("uvicorn") for line in lines)
