"""Streams prompts at an OpenAI-compatible server and times every request.

Each request is a streamed `/v1/chat/completions` or `/v1/completions` call with
`stream_options.include_usage`. Its time to first token (TTFT) runs from sending the request to
the first chunk that carries text; inter-token latencies (ITL) are the gaps between later text
chunks (a chunk that carries several tokens counts once, as in vLLM); the output token count is
the final usage chunk's `completion_tokens`, else the number of text chunks.

Requests arrive all at once, or as a Poisson process of `request_rate` per second (exponential
gaps from a seeded generator); at most `concurrency` of them are in flight, the rest wait on
the client side, and their latency starts when they are sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import httpx

from aicc.loadgen.datasets import Prompt

Endpoint = Literal["chat", "completions"]
PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
ProgressFn = Callable[[int, int, int], None]
"""Called after each request with (finished, failed, total)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how requests are sent."""

    base_url: str
    """Server root, without `/v1`, e.g. `http://127.0.0.1:8080`."""
    model: str
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    verify: ssl.SSLContext | bool = True
    """TLS verification: a context holding `--cacert`, or True for the system CAs."""
    timeout_s: float = 600.0
    """Limit for one whole request, first byte to last."""
    output_len: int = 128
    """`max_tokens` for prompts that do not carry their own."""
    ignore_eos: bool = False
    """Send `ignore_eos` (vLLM/llama.cpp/aicc extension) so every request runs to max_tokens."""


@dataclass(frozen=True, slots=True)
class Load:
    """How requests arrive."""

    concurrency: int | None = None
    """Most requests in flight; None: no limit."""
    request_rate: float = math.inf
    """Mean arrivals per second (Poisson); inf sends every request at once."""
    seed: int = 0


@dataclass(frozen=True, slots=True)
class RequestResult:
    """Timings of one request; `error` set means it failed (timings then cover what came)."""

    start_s: float
    """When it was sent, seconds after the run began."""
    e2e_s: float
    ttft_s: float | None
    """None when no text arrived."""
    itl_s: tuple[float, ...]
    output_tokens: int
    prompt_tokens: int | None
    """From the usage chunk; None when the server sent none."""
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class RunResult:
    """One run at one load level."""

    load: Load
    requests: tuple[RequestResult, ...]
    duration_s: float
    """From the first arrival to the last request's end."""


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times (s after the start): the first at 0, then exponential gaps of mean
    1/`request_rate` (a Poisson process); all 0 for an infinite rate.

    Raises:
        ValueError: a rate that is not positive.
    """
    if not request_rate > 0:
        raise ValueError(f"the request rate must be positive, not {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, now = [], 0.0
    for index in range(num_requests):
        if index:
            now += rng.expovariate(request_rate)
        times.append(now)
    return times


async def run_load(
    target: Target,
    prompts: Sequence[Prompt],
    load: Load,
    progress: ProgressFn | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RunResult:
    """Send every prompt under `load`; failures are recorded, never raised. `transport`
    replaces the network (tests)."""
    max_in_flight = load.concurrency or max(len(prompts), 1)
    slots = asyncio.Semaphore(max_in_flight)
    arrivals = arrival_times(len(prompts), load.request_rate, load.seed)
    counts = [0, 0]  # finished, failed

    async with _client(target, max_in_flight, transport) as client:
        start = time.perf_counter()

        async def one(prompt: Prompt, arrival_s: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + arrival_s - time.perf_counter()))
            async with slots:
                result = await stream_request(client, target, prompt, start)
            counts[0] += 1
            counts[1] += not result.is_ok
            if progress is not None:
                progress(counts[0], counts[1], len(prompts))
            return result

        tasks = [one(p, t) for p, t in zip(prompts, arrivals, strict=True)]
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - start
    return RunResult(load, tuple(results), duration_s)


def _client(
    target: Target, max_connections: int, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx.AsyncClient(
        base_url=target.base_url,
        headers=headers,
        verify=target.verify,
        timeout=httpx.Timeout(target.timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=None),
        follow_redirects=False,
        transport=transport,
    )


def request_body(target: Target, prompt: Prompt) -> dict[str, Any]:
    """The streamed request for `prompt` (greedy, usage in the last chunk)."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": prompt.max_tokens or target.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.endpoint == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in prompt.chat_messages]
    else:
        body["prompt"] = prompt.text
    return body


async def stream_request(
    client: httpx.AsyncClient, target: Target, prompt: Prompt, run_start: float
) -> RequestResult:
    """Send one streamed request and time its chunks. Never raises for server trouble."""
    stream = _Stream(target.endpoint)
    sent = time.perf_counter()
    error: str | None
    try:
        async with asyncio.timeout(target.timeout_s):
            error = await _read_stream(client, target, prompt, stream)
    except (TimeoutError, httpx.TimeoutException):
        error = f"no complete answer within {target.timeout_s:g} s"
    except httpx.RequestError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    end = time.perf_counter()
    times = stream.token_times
    return RequestResult(
        start_s=sent - run_start,
        e2e_s=end - sent,
        ttft_s=times[0] - sent if times else None,
        itl_s=tuple(b - a for a, b in itertools.pairwise(times)),
        output_tokens=stream.completion_tokens
        if stream.completion_tokens is not None
        else len(times),
        prompt_tokens=stream.prompt_tokens,
        error=error,
    )


async def _read_stream(
    client: httpx.AsyncClient, target: Target, prompt: Prompt, stream: _Stream
) -> str | None:
    body = request_body(target, prompt)
    async with client.stream("POST", PATHS[target.endpoint], json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return f"HTTP {response.status_code}: {error_message(response)}"
        async for line in response.aiter_lines():
            error = stream.feed(line, time.perf_counter())
            if error is not None:
                return error
            if stream.is_done:
                return None
    return "the stream ended before data: [DONE]"


class _Stream:
    """What one SSE stream has delivered so far."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.token_times: list[float] = []
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.is_done = False

    def feed(self, line: str, now: float) -> str | None:
        """Take one SSE line; an error message when the stream reports a failure."""
        if not line.startswith("data:"):
            return None  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            self.is_done = True
            return None
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return "the server sent a stream chunk that is not JSON"
        if not isinstance(chunk, dict):
            return "the server sent a stream chunk that is not a JSON object"
        if "error" in chunk:
            return f"error in the stream: {_message_of(chunk)}"
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.completion_tokens = _int_or(usage.get("completion_tokens"), None)
            self.prompt_tokens = _int_or(usage.get("prompt_tokens"), None)
        if self._has_text(chunk.get("choices")):
            self.token_times.append(now)
        return None

    def _has_text(self, choices: object) -> bool:
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if self.endpoint == "completions":
                if choice.get("text"):
                    return True
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and any(
                delta.get(key) for key in ("content", "reasoning_content", "tool_calls")
            ):
                return True
        return False


def _int_or(value: object, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-style error answer, else the HTTP reason."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        message = _message_of(data)
        if message:
            return message
    return response.reason_phrase or "error"


def _message_of(data: dict[str, Any]) -> str:
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    detail = data.get("detail")
    return detail if isinstance(detail, str) else ""


class ProgressLine:
    """A one-line progress display on a terminal (redrawn at most 10 times a second); when
    the stream is not a terminal, one line per finished run."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.is_terminal = stream.isatty()
        self.started = time.perf_counter()
        self.last_drawn = 0.0

    def __call__(self, finished: int, failed: int, total: int) -> None:
        now = time.perf_counter()
        is_last = finished == total
        if not is_last and (not self.is_terminal or now - self.last_drawn < 0.1):
            return
        self.last_drawn = now
        line = self._line(finished, failed, total, now - self.started)
        if self.is_terminal:
            self.stream.write("\r" + line + ("\n" if is_last else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _line(self, finished: int, failed: int, total: int, elapsed_s: float) -> str:
        width = 24
        filled = width * finished // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        return (
            f"{self.label} [{bar}] {finished}/{total} requests, {failed} failed, {elapsed_s:.1f} s"
        )
