"""Rate limits and quotas through the live server: each limit trips at its count with a 429
that names it and carries Retry-After; usage comes from the engine's real token counts."""

from __future__ import annotations

import httpx
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer

BODY = {"model": BUNDLED_MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 4}


def _post(server: LiveServer, key: str, body: dict[str, object] = BODY) -> httpx.Response:
    return httpx.post(
        server.base_url + "/v1/completions", json=body, headers={"x-api-key": key}, timeout=60
    )


def _assert_limited(response: httpx.Response, words: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert words in error["message"], error["message"]


def test_requests_per_minute_of_a_key(server: LiveServer) -> None:
    key = server.create_user_key("quota-rpm", rpm=3)
    for _ in range(3):
        assert _post(server, key).status_code == 200
    _assert_limited(_post(server, key), "3 requests per minute")


def test_requests_per_minute_of_a_user_cover_all_its_keys(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as admin:
        body = {"username": "quota-user-rpm", "roles": ["user"], "rpm": 2}
        assert admin.post("/admin/users", json=body).status_code == 201
    first = server.create_user_key("quota-user-rpm")
    second = server.create_user_key("quota-user-rpm")
    assert _post(server, first).status_code == 200
    assert _post(server, second).status_code == 200
    _assert_limited(_post(server, first), "2 requests per minute")
    _assert_limited(_post(server, second), "quota-user-rpm")


@pytest.mark.parametrize(("field", "words"), [("tpm", "tokens per minute"), ("tpd", "per day")])
def test_token_limits_count_real_usage(server: LiveServer, field: str, words: str) -> None:
    key = server.create_user_key(f"quota-{field}", **{field: 20})
    response = _post(server, key, {**BODY, "max_tokens": 16, "ignore_eos": True})
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["total_tokens"] >= 20  # the engine's counts, above the limit
    _assert_limited(_post(server, key), words)


def test_concurrent_streams(server: LiveServer) -> None:
    key = server.create_user_key("quota-streams", max_streams=1)
    body = {**BODY, "max_tokens": 64, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body, headers={"x-api-key": key}) as running,
    ):
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)  # the stream is under way
        _assert_limited(_post(server, key), "concurrent")
    server.wait_until_idle()
    assert _post(server, key).status_code == 200  # the slot is free again
