"""The engine thread survives a request it cannot start."""

from __future__ import annotations

import asyncio
import time

from aicc.engine.llamacpp.loop import Submit
from aicc.engine.types import GenerationRequest, SamplingParams
from tests.conftest import LiveServer


def test_a_request_that_cannot_start_fails_alone(server: LiveServer) -> None:
    engine_loop = server.engine._loop_runner  # type: ignore[attr-defined]
    out: asyncio.Queue[object] = asyncio.Queue()
    # Past the client's checks (which refuse this grammar with a 400): llama.cpp cannot parse it.
    bad = GenerationRequest("bad-grammar", (2, 3), SamplingParams(n=2, grammar="root ::= ("))
    engine_loop.inbox.put(Submit(bad, 4, out))
    deadline = time.monotonic() + 10
    while out.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    item = out.get_nowait()
    assert isinstance(item, Exception)
    assert engine_loop.thread.is_alive()
    assert server.engine.health().is_ready
    server.wait_until_idle()
