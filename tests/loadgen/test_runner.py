"""The runner's arrival schedule, stream timing and failure handling.

Stream parsing is checked against scripted SSE answers (httpx.MockTransport, so the chunk
timing is ours to set); a closed port checks real connection failures."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import socket
import statistics
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest

from aicc.loadgen.datasets import Message, Prompt
from aicc.loadgen.runner import (
    Load,
    ProgressLine,
    RequestResult,
    Target,
    arrival_times,
    run_load,
    stream_request,
)

TARGET = Target(base_url="http://bench.test", model="m", output_len=8)
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def test_poisson_arrivals_are_seeded_with_the_right_mean() -> None:
    times = arrival_times(4000, request_rate=20.0, seed=3)
    assert times[0] == 0.0
    assert times == sorted(times)
    assert times == arrival_times(4000, request_rate=20.0, seed=3)
    assert times != arrival_times(4000, request_rate=20.0, seed=4)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 20, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.stdev(gaps) == pytest.approx(1 / 20, rel=0.1)


def test_infinite_rate_sends_everything_at_once_and_bad_rates_fail() -> None:
    assert arrival_times(3, float("inf"), seed=0) == [0.0, 0.0, 0.0]
    for rate in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="must be positive"):
            arrival_times(3, rate, seed=0)


def sse(*events: dict[str, Any] | str, gap_s: float = 0.0) -> Handler:
    """A handler answering with these SSE events (`[DONE]` as the string "[DONE]")."""

    async def handle(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            for event in events:
                await asyncio.sleep(gap_s)
                data = event if isinstance(event, str) else json.dumps(event)
                yield f"data: {data}\n\n".encode()

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    return handle


def chat_chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}


def send(handler: Handler, target: Target = TARGET, prompt: Prompt | None = None) -> RequestResult:
    async def go() -> RequestResult:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url=target.base_url, transport=transport) as client:
            return await stream_request(client, target, prompt or Prompt("hi"), 0.0)

    return asyncio.run(go())


def test_chat_stream_timings_and_usage() -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    handler = sse(
        role, chat_chunk("A"), chat_chunk("B"), chat_chunk("C"), USAGE, "[DONE]", gap_s=0.05
    )
    result = send(handler)
    assert result.is_ok, result.error
    # The role chunk carries no text: the first token came with the second event.
    assert result.ttft_s is not None
    assert result.ttft_s >= 0.09
    assert len(result.itl_s) == 2
    assert all(gap >= 0.04 for gap in result.itl_s)
    assert result.e2e_s >= result.ttft_s + sum(result.itl_s)
    assert (result.output_tokens, result.prompt_tokens) == (5, 7)


def test_without_usage_text_chunks_are_counted() -> None:
    result = send(sse(chat_chunk("A"), chat_chunk("B"), "[DONE]"))
    assert result.is_ok
    assert (result.output_tokens, result.prompt_tokens) == (2, None)


def test_completions_stream_and_request_body() -> None:
    seen: list[dict[str, Any]] = []
    reply = sse({"choices": [{"index": 0, "text": "x"}]}, "[DONE]")

    async def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        seen.append(json.loads(request.content))
        return await reply(request)

    target = Target(
        base_url="http://bench.test", model="m", endpoint="completions", ignore_eos=True
    )
    result = send(handle, target, Prompt("Once upon", max_tokens=3))
    assert result.is_ok
    assert result.output_tokens == 1
    assert seen == [
        {
            "model": "m",
            "max_tokens": 3,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "prompt": "Once upon",
        }
    ]


def test_chat_body_carries_the_messages() -> None:
    seen: list[dict[str, Any]] = []
    reply = sse(chat_chunk("x"), "[DONE]")

    async def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        seen.append(json.loads(request.content))
        return await reply(request)

    prompt = Prompt("s\nu", (Message("system", "s"), Message("user", "u")))
    assert send(handle, prompt=prompt).is_ok
    assert seen[0]["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
    ]
    assert seen[0]["max_tokens"] == 8
    assert "ignore_eos" not in seen[0]


def test_http_error_is_recorded_with_the_servers_message() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"message": "queue full", "code": "busy"}})

    result = send(handle)
    assert result.error == "HTTP 429: queue full"
    assert (result.ttft_s, result.output_tokens) == (None, 0)


def test_stream_errors_are_failures() -> None:
    mid_stream = send(sse(chat_chunk("A"), {"error": {"message": "engine died"}}))
    assert mid_stream.error == "error in the stream: engine died"
    assert mid_stream.output_tokens == 1
    assert "[DONE]" in (send(sse(chat_chunk("A"))).error or "")
    assert "not JSON" in (send(sse("{oops", "[DONE]")).error or "")


def test_a_slow_answer_times_out() -> None:
    target = Target(base_url="http://bench.test", model="m", timeout_s=0.2)
    result = send(sse(chat_chunk("A"), chat_chunk("B"), "[DONE]", gap_s=0.15), target)
    assert result.error == "no complete answer within 0.2 s"
    assert result.e2e_s < 1.0


def test_concurrency_bounds_requests_in_flight() -> None:
    in_flight = [0, 0]  # now, peak
    reply = sse(chat_chunk("A"), "[DONE]")

    async def handle(request: httpx.Request) -> httpx.Response:
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        await asyncio.sleep(0.02)
        in_flight[0] -= 1
        return await reply(request)

    prompts = [Prompt(str(i)) for i in range(8)]
    transport = httpx.MockTransport(handle)
    run = asyncio.run(run_load(TARGET, prompts, Load(concurrency=3), transport=transport))
    assert all(r.is_ok for r in run.requests)
    assert in_flight[1] == 3


def test_poisson_run_sends_on_schedule() -> None:
    prompts = [Prompt(str(i)) for i in range(6)]
    load = Load(request_rate=50.0, seed=1)
    transport = httpx.MockTransport(sse(chat_chunk("A"), "[DONE]"))
    run = asyncio.run(run_load(TARGET, prompts, load, transport=transport))
    for result, planned in zip(run.requests, arrival_times(6, 50.0, seed=1), strict=True):
        assert planned <= result.start_s < planned + 0.5  # generous: a busy machine
    assert run.duration_s >= arrival_times(6, 50.0, seed=1)[-1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_closed_port_counts_every_request_as_failed() -> None:
    target = Target(base_url=f"http://127.0.0.1:{closed_port()}", model="m", timeout_s=5)
    calls: list[tuple[int, int, int]] = []
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    run = asyncio.run(run_load(target, prompts, Load(concurrency=2), lambda *c: calls.append(c)))
    assert [r.is_ok for r in run.requests] == [False, False, False]
    assert all("ConnectError" in (r.error or "") for r in run.requests)
    assert calls == [(1, 1, 3), (2, 2, 3), (3, 3, 3)]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line() -> None:
    piped = io.StringIO()
    progress = ProgressLine(piped, "c=4")
    for done in range(1, 5):
        progress(done, 1, 4)
    assert piped.getvalue().count("\n") == 1
    assert piped.getvalue().startswith("c=4 [########################] 4/4 requests, 1 failed, ")
    terminal = Terminal()
    progress = ProgressLine(terminal, "c=1")
    progress(1, 0, 2)
    progress(2, 0, 2)
    assert terminal.getvalue().startswith("\rc=1 [############............] 1/2 requests")
    assert terminal.getvalue().endswith(" s\n")
