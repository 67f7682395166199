"""Bad input gets OpenAI-style JSON errors with the right status, and never hurts the server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:
        yield client


def assert_error(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return dict(error)


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


def test_wrong_types_and_missing_fields(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/chat/completions", json={"model": BUNDLED_MODEL_NAME}), 400)
    assert error["param"] == "messages"
    error = assert_error(http.post("/v1/completions", json={"model": 5, "prompt": "x"}), 400)
    assert error["param"] == "model"
    response = http.post("/v1/chat/completions", json=[1, 2, 3])
    assert_error(response, 400)


def test_unsupported_content_part(http: httpx.Client) -> None:
    body = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    }
    assert_error(http.post("/v1/chat/completions", json=body), 400)


def test_out_of_vocabulary_token_ids(http: httpx.Client, server: LiveServer) -> None:
    vocab_size = server.engine.model_info.vocab_size
    body = {"model": BUNDLED_MODEL_NAME, "prompt": [1, vocab_size], "max_tokens": 2}
    error = assert_error(http.post("/v1/completions", json=body), 400)
    assert error["param"] == "prompt"


def test_oversized_body_is_413(http: httpx.Client, server: LiveServer) -> None:
    limit = server.app.state.settings.max_body_bytes
    body = b'{"model": "x", "prompt": "' + b"a" * limit + b'"}'
    assert_error(http.post("/v1/completions", content=body), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"model": "x", "prompt": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunks()), 413, "payload_too_large")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert (
        http.get("/healthz", headers={"x-request-id": "abc-1"}).headers["x-request-id"] == "abc-1"
    )


def test_server_still_serves_after_bad_input(http: httpx.Client) -> None:
    body = {"model": BUNDLED_MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
    assert http.post("/v1/completions", json=body).status_code == 200
