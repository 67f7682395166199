"""Continuous batching under load, cancellation, overload and context limits — live server."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer

MODEL = BUNDLED_MODEL_NAME
TOPICS = [
    "cats", "the moon", "bread", "rivers", "chess", "winter", "bicycles", "volcanoes",
    "music", "bees", "castles", "rain", "trains", "coffee", "forests", "robots",
]  # fmt: skip


async def _stream_text(client: openai.AsyncOpenAI, topic: str, seed: int) -> str:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Tell me one fact about {topic}."}],
        max_tokens=32,
        temperature=0,
        seed=seed,
        stream=True,
    )
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    return "".join(parts)


async def _solo_then_together(server: LiveServer) -> tuple[list[str], list[str], int]:
    async with openai.AsyncOpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as client:
        solo = [await _stream_text(client, topic, 7) for topic in TOPICS]
        steps_before = server.engine.stats().num_steps
        together = await asyncio.gather(*(_stream_text(client, t, 7) for t in TOPICS))
        return solo, list(together), server.engine.stats().num_steps - steps_before


def test_16_concurrent_streams_are_batched_and_independent(server: LiveServer) -> None:
    solo, together, num_steps = asyncio.run(_solo_then_together(server))
    assert all(together), "every stream produced text"
    assert len(set(together)) == len(TOPICS), "each stream has its own output"
    for alone, batched, topic in zip(solo, together, TOPICS, strict=True):
        # llama.cpp's kernels round differently for different batch shapes, so a near-tie may
        # flip late in the text; the start must agree (cross-talk would break it at once).
        assert batched[:12] == alone[:12], topic
    # 16 streams of <= 32 tokens take far fewer steps than one at a time (16 * 33).
    assert num_steps < 16 * 33 / 4
    server.wait_until_idle()


def test_deterministic_mode_gives_the_same_text_alone_or_in_a_busy_batch(
    deterministic_server: LiveServer,
) -> None:
    solo, together, _ = asyncio.run(_solo_then_together(deterministic_server))
    assert all(solo)
    assert together == solo, "same prompt and seed give the same text alone or in a busy batch"
    assert deterministic_server.engine.stats().num_preemptions == 0


def test_client_disconnect_removes_sequence_from_batch(server: LiveServer) -> None:
    before = server.engine.stats()
    body = {
        "model": MODEL,
        "prompt": "Write a very long story about a dragon.",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.engine.stats().num_running == 1
    # The client is gone: the sequence must leave the batch almost at once.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = server.engine.stats()
        if after.num_running == 0 and after.num_aborted > before.num_aborted:
            break
        time.sleep(0.01)
    assert after.num_running == 0
    assert after.num_aborted == before.num_aborted + 1
    assert after.num_outstanding == 0


def test_non_streaming_disconnect_aborts(server: LiveServer) -> None:
    before = server.engine.stats()
    body = {"model": MODEL, "prompt": "Story:", "max_tokens": 2000, "ignore_eos": True}
    with (
        httpx.Client(base_url=server.base_url, headers=server.headers, timeout=1.0) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/completions", json=body)
    server.wait_until_idle(timeout=5)
    assert server.engine.stats().num_aborted == before.num_aborted + 1


def test_context_overflow_is_400(server: LiveServer) -> None:
    max_context = server.engine.model_info.max_context
    prompt = "hello " * (max_context + 10)
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        body = caught.value.body
        assert isinstance(body, dict)
        assert body["code"] == "context_length_exceeded"
        assert str(max_context) in body["message"]
        # A prompt that fits but a max_tokens that does not is refused the same way.
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=max_context)
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "context_length_exceeded"


def test_queue_full_is_429_with_retry_after(tiny_server: LiveServer) -> None:
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    # One slot and one queue place: the first two are accepted, the third refused.
    with (
        httpx.Client(
            base_url=tiny_server.base_url, headers=tiny_server.headers, timeout=30
        ) as http,
        http.stream("POST", "/v1/completions", json=body) as first,
        http.stream("POST", "/v1/completions", json=body) as second,
    ):
        assert first.status_code == 200
        assert second.status_code == 200
        third = http.post("/v1/completions", json={**body, "stream": False})
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        error = third.json()["error"]
        assert error["code"] == "queue_full"
        assert error["type"] == "rate_limit_error"
    tiny_server.wait_until_idle()
    # Once the load is gone, requests are served again.
    with httpx.Client(
        base_url=tiny_server.base_url, headers=tiny_server.headers, timeout=30
    ) as http:
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_request_timeout_frees_the_sequence(tiny_server: LiveServer) -> None:
    body = {"model": MODEL, "prompt": "Story:", "max_tokens": 900, "ignore_eos": True}
    with httpx.Client(
        base_url=tiny_server.base_url, headers=tiny_server.headers, timeout=60
    ) as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    tiny_server.wait_until_idle(timeout=2)
