"""The remote client against a live aicc on loopback: answers, streams, usage, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aicc.router.remote import RemoteClient, RemoteUpstream
from aicc.router.upstream import UpstreamResponse
from tests.conftest import LiveServer, start_server

MESSAGES = [{"role": "user", "content": "Count from one to five."}]


@pytest.fixture(scope="module")
def aicc(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(model_dir, threads=1)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def model(aicc: LiveServer) -> str:
    async def names() -> list[str]:
        client = RemoteClient(RemoteUpstream(aicc.base_url, aicc.api_key))
        try:
            assert await client.health()
            return [card["id"] for card in await client.models()]
        finally:
            await client.aclose()

    served = asyncio.run(names())
    assert served
    return served[0]


def payloads(chunks: list[bytes]) -> list[Any]:
    """The data of each SSE chunk (each a single whole event), `[DONE]` as a string."""
    out = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ")
        assert chunk.endswith(b"\n\n")
        assert chunk.count(b"\n\n") == 1
        data = chunk[len(b"data: ") : -2].decode()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def read_stream(
    aicc: LiveServer, path: str, body: dict[str, Any]
) -> tuple[UpstreamResponse, list[bytes]]:
    client = RemoteClient(RemoteUpstream(aicc.base_url, aicc.api_key))
    try:
        response = await client.open(path, body)
        assert response.is_stream
        return response, [chunk async for chunk in response.chunks()]
    finally:
        await client.aclose()


def test_non_streamed_chat(aicc: LiveServer, model: str) -> None:
    async def go() -> tuple[UpstreamResponse, dict[str, Any]]:
        client = RemoteClient(RemoteUpstream(aicc.base_url + "/v1", aicc.api_key))
        try:
            body = {"model": model, "messages": MESSAGES, "max_tokens": 8}
            response = await client.open("/v1/chat/completions", body)
            return response, await response.json()
        finally:
            await client.aclose()

    response, answer = asyncio.run(go())
    assert response.status == 200
    assert not response.is_stream
    assert response.headers["content-type"] == "application/json"
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"]
    facts = response.facts
    assert facts.num_prompt_tokens == answer["usage"]["prompt_tokens"] > 0
    assert facts.num_completion_tokens == answer["usage"]["completion_tokens"]
    assert facts.num_completion_tokens is not None
    assert 0 < facts.num_completion_tokens <= 8
    assert facts.finish_reason == answer["choices"][0]["finish_reason"]
    assert response.upstream_request_id


def test_streamed_chat_is_passed_through_and_measured(aicc: LiveServer, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 12, "stream": True}
    response, chunks = asyncio.run(read_stream(aicc, "/v1/chat/completions", body))
    events = payloads(chunks)
    assert events[-1] == "[DONE]"
    assert all(isinstance(event, dict) and event["choices"] for event in events[:-1])
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events[:-1])
    assert text
    facts = response.facts
    assert facts.num_completion_tokens is not None
    assert 0 < facts.num_completion_tokens <= 12
    assert facts.num_prompt_tokens is not None
    assert facts.num_prompt_tokens > 0
    assert facts.finish_reason == events[-2]["choices"][0]["finish_reason"]
    assert facts.first_token_at is not None
    assert facts.last_token_at is not None
    assert response.started < facts.first_token_at <= facts.last_token_at  # TTFT ≤ E2E
    assert response.bytes_sent_to_client == sum(map(len, chunks))
    assert not response.can_retry


def test_streamed_completion_keeps_the_usage_chunk_it_asked_for(
    aicc: LiveServer, model: str
) -> None:
    body = {
        "model": model,
        "prompt": "One, two, three,",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response, chunks = asyncio.run(read_stream(aicc, "/v1/completions", body))
    events = payloads(chunks)
    usage = events[-2]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == response.facts.num_completion_tokens
    assert usage["usage"]["prompt_tokens"] == response.facts.num_prompt_tokens
    assert response.facts.first_token_at is not None


def test_embeddings_are_measured(aicc: LiveServer, model: str) -> None:
    async def go() -> tuple[UpstreamResponse, dict[str, Any]]:
        client = RemoteClient(RemoteUpstream(aicc.base_url, aicc.api_key))
        try:
            body = {"model": model, "input": ["hello there", "general kenobi"]}
            response = await client.open("/v1/embeddings", body)
            return response, await response.json()
        finally:
            await client.aclose()

    response, answer = asyncio.run(go())
    assert len(answer["data"]) == 2
    assert response.facts.num_prompt_tokens == answer["usage"]["prompt_tokens"] > 0
    assert response.facts.num_completion_tokens == 0


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_4xx_are_passed_through(aicc: LiveServer, model: str, stream: bool) -> None:
    async def go(key: str, model_name: str) -> tuple[int, dict[str, Any]]:
        client = RemoteClient(RemoteUpstream(aicc.base_url, key))
        try:
            body = {"model": model_name, "messages": MESSAGES, "stream": stream}
            response = await client.open("/v1/chat/completions", body)
            assert not response.is_stream
            return response.status, await response.json()
        finally:
            await client.aclose()

    status, body = asyncio.run(go("aicc-sk-wrong", model))
    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    status, body = asyncio.run(go(aicc.api_key, "no-such-model"))
    assert status == 404
    assert body["error"]["code"] == "model_not_found"


def test_closing_a_stream_early_stops_the_upstream_generation(aicc: LiveServer, model: str) -> None:
    async def go() -> bytes:
        client = RemoteClient(RemoteUpstream(aicc.base_url, aicc.api_key))
        body = {
            "model": model,
            "messages": MESSAGES,
            "max_tokens": 2000,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            response = await client.open("/v1/chat/completions", body)
            chunks = response.chunks()
            first = await anext(chunks)  # the role chunk may come before the engine admits it
            deadline = time.monotonic() + 10
            while aicc.engine.stats().num_running != 1:
                assert time.monotonic() < deadline, "the generation did not start"
                await asyncio.sleep(0.01)
            await chunks.aclose()  # what the gateway does when its client goes away
            aicc.wait_until_idle(timeout=2.0)  # 2000 tokens would take far longer
            return first
        finally:
            await client.aclose()

    assert asyncio.run(go()).startswith(b"data: ")
