"""Overload of a real `aicc serve` process: 4x its capacity (batch + queue) at once, three
times over. Every request gets a complete answer or a fast 429 with `Retry-After`, and the
server's memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.api.test_drain import HEADERS, ServeProcess, start_serve

MAX_BATCH_SIZE = 4
MAX_QUEUE = 12
CAPACITY = MAX_BATCH_SIZE + MAX_QUEUE
NUM_ROUNDS = 3
MAX_TOKENS = 4
FAST_REFUSAL_S = 2.0
"""A 429 comes before any work: well under the time one answer takes."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    latency_s: float
    is_complete: bool
    retry_after: str | None
    code: str | None


@pytest.fixture(scope="module")
def busy_server(model_dir: Path) -> Iterator[ServeProcess]:
    served = start_serve(
        model_dir,
        5.0,
        "--max-batch-size",
        str(MAX_BATCH_SIZE),
        "--max-queue",
        str(MAX_QUEUE),
        "--ctx-size",
        "2048",
    )
    yield served
    served.process.kill()
    served.process.wait()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _one(client: httpx.AsyncClient, index: int) -> Outcome:
    is_stream = index % 2 == 0
    body = {
        "model": BUNDLED_MODEL_NAME,
        "prompt": f"Request {index}: once upon a time",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": is_stream,
    }
    start = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        content = await response.aread()
    latency_s = time.monotonic() - start
    code = None
    is_complete = False
    if response.status_code == 200 and is_stream:
        events = [line[6:] for line in content.decode().splitlines() if line.startswith("data: ")]
        chunks = [json.loads(event) for event in events[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        is_complete = events[-1] == "[DONE]" and reasons[-1] == "length"
    elif response.status_code == 200:
        is_complete = json.loads(content)["usage"]["completion_tokens"] == MAX_TOKENS
    else:
        code = json.loads(content)["error"]["code"]
    return Outcome(
        response.status_code, latency_s, is_complete, response.headers.get("retry-after"), code
    )


async def _burst(base_url: str, num: int) -> list[Outcome]:
    limits = httpx.Limits(max_connections=num, max_keepalive_connections=num)
    async with httpx.AsyncClient(
        base_url=base_url, headers=HEADERS, timeout=120, limits=limits
    ) as client:
        return list(await asyncio.gather(*(_one(client, i) for i in range(num))))


def test_4x_capacity_gets_answers_or_fast_429s_in_bounded_memory(
    busy_server: ServeProcess,
) -> None:
    pid = busy_server.process.pid
    warm = asyncio.run(_burst(busy_server.base_url, MAX_BATCH_SIZE))
    assert all(o.is_complete for o in warm)
    rss_before = _rss_bytes(pid)
    for _ in range(NUM_ROUNDS):
        outcomes = asyncio.run(_burst(busy_server.base_url, 4 * CAPACITY))
        answered = [o for o in outcomes if o.status == 200]
        refused = [o for o in outcomes if o.status != 200]
        assert all(o.is_complete for o in answered), "an accepted request is answered in full"
        assert len(answered) >= CAPACITY, "the batch and the queue were used"
        assert refused, "4x capacity cannot all be taken"
        for outcome in refused:
            assert (outcome.status, outcome.code, outcome.retry_after) == (429, "queue_full", "1")
            assert outcome.latency_s < FAST_REFUSAL_S
    rss_after = _rss_bytes(pid)
    assert rss_after < 1.5 * rss_before + 200 * 2**20, (rss_before, rss_after)
    # Nothing was left behind: the next request is served at once.
    assert asyncio.run(_burst(busy_server.base_url, 1))[0].is_complete
