"""A client that leaves before its answer began: the work stops, the call is recorded 499 (the
client's choice, not a server error) and nothing is logged as a failure."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from aicc.audit.query import query
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer


def test_a_client_that_leaves_before_its_answer_is_recorded_499(server: LiveServer) -> None:
    request_id = uuid.uuid4().hex
    body = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    headers = {**server.headers, "X-Request-ID": request_id}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers,
                   timeout=1.0)  # fmt: skip
    server.wait_until_idle(timeout=5.0)  # 1500 tokens would take far longer: it was stopped
    deadline = time.monotonic() + 5
    while True:
        entries = [e for e in query(server.app.state.audit.db, limit=10000)
                   if e.request_id == request_id]  # fmt: skip
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [e.status for e in entries] == [499]
    assert entries[0].error_code is None
