"""Per-request deadlines: `request_timeout_s` lowered by `X-Request-Timeout`, live server; the
middleware's own logic (never cut a send short, leave others' cancellations alone) with fakes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from aicc.api.deadline import DeadlineMiddleware
from aicc.audit.query import query
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer, start_server

REQUEST_TIMEOUT_S = 4.0
LONG = {"model": BUNDLED_MODEL_NAME, "prompt": "Story:", "max_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def deadline_server(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(
        model_dir, max_batch_size=2, ctx_size=2048, threads=1, request_timeout_s=REQUEST_TIMEOUT_S
    )
    _post(live, {**LONG, "max_tokens": 1}, None)  # the first decode is slow (set-up)
    yield live
    live.stop()


def _post(server: LiveServer, body: dict[str, Any], timeout: str | None) -> httpx.Response:
    headers = dict(server.headers)
    if timeout is not None:
        headers["X-Request-Timeout"] = timeout
    return httpx.post(server.base_url + "/v1/completions", json=body, headers=headers, timeout=30)


def _entry_of(server: LiveServer, request_id: str) -> tuple[int, str | None]:
    found = [e for e in query(server.app.state.audit.db, limit=1000) if e.request_id == request_id]
    assert len(found) == 1, found
    return found[0].status, found[0].error_code


def test_header_deadline_aborts_a_generation_with_504(deadline_server: LiveServer) -> None:
    start = time.monotonic()
    response = _post(deadline_server, LONG, "0.8")
    elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    assert "0.8 s" in response.json()["error"]["message"]
    assert 0.8 <= elapsed < 2.5
    # Aborted, not finished (900 tokens take far longer); the step under way ends first.
    deadline_server.wait_until_idle()
    assert _entry_of(deadline_server, response.headers["x-request-id"]) == (504, "request_timeout")


def test_stream_past_its_deadline_ends_with_an_error_event(deadline_server: LiveServer) -> None:
    headers = {**deadline_server.headers, "X-Request-Timeout": "1"}
    with httpx.stream(
        "POST",
        deadline_server.base_url + "/v1/completions",
        json={**LONG, "stream": True},
        headers=headers,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]
    assert len(events) > 2, "tokens streamed before the deadline"
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "request_timeout"
    assert "text" in json.loads(events[-2])["choices"][0]
    deadline_server.wait_until_idle()
    assert _entry_of(deadline_server, request_id) == (200, "request_timeout")


def test_the_setting_caps_a_longer_header(deadline_server: LiveServer) -> None:
    start = time.monotonic()
    response = _post(deadline_server, LONG, "3600")
    assert response.status_code == 504
    assert REQUEST_TIMEOUT_S <= time.monotonic() - start < REQUEST_TIMEOUT_S + 2
    deadline_server.wait_until_idle()


def test_a_request_within_its_deadline_is_answered(deadline_server: LiveServer) -> None:
    response = _post(deadline_server, {**LONG, "max_tokens": 4}, "20")
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "86401", "1" * 100])
def test_a_bad_header_is_a_400(deadline_server: LiveServer, value: str) -> None:
    steps = deadline_server.engine.stats().num_steps
    response = _post(deadline_server, LONG, value)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_value"
    assert "X-Request-Timeout" in error["message"]
    assert len(error["message"]) < 200
    assert deadline_server.engine.stats().num_steps == steps  # never reached the engine


def test_routes_outside_the_api_ignore_the_header(deadline_server: LiveServer) -> None:
    response = httpx.get(
        deadline_server.base_url + "/healthz", headers={"X-Request-Timeout": "abc"}, timeout=10
    )
    assert response.status_code == 200


# -- the middleware alone, over fake apps and a fake server ------------------------------------
class _Server:
    """Records what the middleware sends; one send of `slow_kind` takes `slow_s`."""

    def __init__(self, slow_kind: str = "", slow_s: float = 0.0) -> None:
        self.sent: list[Message] = []
        self.slow_kind = slow_kind
        self.slow_s = slow_s

    async def send(self, message: Message) -> None:
        if message["type"] == self.slow_kind:
            await asyncio.sleep(self.slow_s)
        self.sent.append(message)


def _scope(spec_version: str = "2.4") -> Scope:
    asgi = {"version": "3.0", "spec_version": spec_version}
    return {"type": "http", "path": "/v1/completions", "headers": [], "state": {}, "asgi": asgi}


async def _receive() -> Message:
    await asyncio.sleep(3600)  # the client stays
    return {"type": "http.disconnect"}


async def _stream_forever(scope: Scope, receive: Receive, send: Send) -> None:
    async def events() -> AsyncIterator[bytes]:
        while True:
            yield b"data: {}\n\n"
            await asyncio.sleep(0.01)

    await StreamingResponse(events(), media_type="text/event-stream")(scope, receive, send)


# ASGI 2.4 streams in the request's task; before it, Starlette streams in a child task.
@pytest.mark.parametrize("spec_version", ["2.4", "2.0"])
def test_a_send_in_progress_at_the_deadline_is_finished_first(spec_version: str) -> None:
    # The first body message takes 0.3 s to hand over (an audit commit, a slow socket); the
    # deadline (0.1 s) falls inside it: that message still goes out whole, then the error event.
    server = _Server("http.response.body", 0.3)
    middleware = DeadlineMiddleware(_stream_forever, request_timeout_s=0.1)
    run = middleware(_scope(spec_version), _receive, server.send)
    asyncio.run(asyncio.wait_for(run, timeout=10))
    bodies = [m for m in server.sent if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies[:-1]] == [b"data: {}\n\n"]
    assert bodies[-1]["more_body"] is False
    assert b"request_timeout" in bodies[-1]["body"]


@pytest.mark.parametrize("spec_version", ["2.4", "2.0"])
def test_a_stream_is_cut_at_the_deadline(spec_version: str) -> None:
    server = _Server()
    middleware = DeadlineMiddleware(_stream_forever, request_timeout_s=0.2)
    run = middleware(_scope(spec_version), _receive, server.send)
    asyncio.run(asyncio.wait_for(run, timeout=10))
    bodies = [m for m in server.sent if m["type"] == "http.response.body"]
    assert len(bodies) > 3
    assert all(m["more_body"] for m in bodies[:-1])
    assert json.loads(bodies[-1]["body"][6:])["error"]["code"] == "request_timeout"


def test_a_cancellation_from_elsewhere_is_not_turned_into_a_504() -> None:
    server = _Server()
    middleware = DeadlineMiddleware(_stream_forever, request_timeout_s=60)

    async def cancel_after_a_while() -> None:
        task = asyncio.create_task(middleware(_scope(), _receive, server.send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_after_a_while())
    assert all(b"request_timeout" not in m.get("body", b"") for m in server.sent)
    assert all(m.get("more_body", True) for m in server.sent[1:])


def test_no_response_yet_at_the_deadline_gets_a_504() -> None:
    async def think(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(60)

    server = _Server()
    asyncio.run(DeadlineMiddleware(think, request_timeout_s=0.05)(_scope(), _receive, server.send))
    assert server.sent[0]["status"] == 504
    assert json.loads(server.sent[1]["body"])["error"]["code"] == "request_timeout"


def test_the_deadline_is_left_in_the_request_state_for_upstream_calls() -> None:
    seen: list[float] = []

    async def look(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["deadline"] - asyncio.get_running_loop().time())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    scope = {**_scope(), "headers": [(b"x-request-timeout", b"2.5")]}
    asyncio.run(DeadlineMiddleware(look, request_timeout_s=10)(scope, _receive, _Server().send))
    assert 2.4 < seen[0] <= 2.5
