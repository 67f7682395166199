"""`POST /tokenize` and `POST /detokenize` (llama-server's shape) against a live aicc."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import LiveServer

TEXT = "Hello, world! héllo 世界 🙂"


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:
        yield client


def test_round_trip(http: httpx.Client, server: LiveServer) -> None:
    response = http.post("/tokenize", json={"content": TEXT})
    assert response.status_code == 200, response.text
    tokens = response.json()["tokens"]
    assert tokens == server.engine.tokenize(TEXT, add_special=False)
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"content": TEXT}


def test_add_special_and_special_tokens_as_text(http: httpx.Client, server: LiveServer) -> None:
    plain = http.post("/tokenize", json={"content": "Hi"}).json()["tokens"]
    with_bos = http.post("/tokenize", json={"content": "Hi", "add_special": True}).json()["tokens"]
    assert with_bos[1:] == plain
    bos = server.engine.model_info.bos_token
    assert bos == "<bos>"
    assert http.post("/detokenize", json={"tokens": with_bos}).json()["content"] == bos + "Hi"
    # Special-token markup in the content is parsed to the special token and rendered back.
    markup = "<start_of_turn>user\nHi<end_of_turn>"
    tokens = http.post("/tokenize", json={"content": markup}).json()["tokens"]
    assert len(tokens) < len(plain) + 6
    assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == markup


def test_with_pieces(http: httpx.Client, server: LiveServer) -> None:
    text = "Tokenizers split words"
    response = http.post("/tokenize", json={"content": text, "with_pieces": True})
    pieces = response.json()["tokens"]
    assert [p["id"] for p in pieces] == server.engine.tokenize(text, add_special=False)
    assert all(set(p) == {"id", "piece"} for p in pieces)
    assert "".join(p["piece"] for p in pieces) == text
    empty = http.post("/tokenize", json={"content": "", "with_pieces": True}).json()
    assert empty == {"tokens": []}


@pytest.mark.parametrize("tokens", [[-1], [1, 262144], [10**12]])
def test_bad_ids_are_400(http: httpx.Client, server: LiveServer, tokens: list[int]) -> None:
    response = http.post("/detokenize", json={"tokens": tokens})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "tokens"
    assert http.get("/readyz").status_code == 200
    assert http.post("/detokenize", json={"tokens": [9259]}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {}),
        ("/tokenize", {"content": 5}),
        ("/detokenize", {"tokens": "abc"}),
        ("/detokenize", {"tokens": [1.5]}),
    ],
)
def test_malformed_bodies_are_400(http: httpx.Client, path: str, body: object) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_large_content(http: httpx.Client, server: LiveServer) -> None:
    text = "All work and no play makes Jack a dull boy. " * 1000  # past the off-loop threshold
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert len(tokens) > 10000
    assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == text
