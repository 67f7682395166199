"""A deployment's in-process replica that cannot take a call (its engine is full) hands it,
before any byte was sent, to a remote replica: the client gets an answer, not a 429."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, LiveServer, start_server

KEY_ENV = "AICC_TEST_RETRY_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def servers(model_dir: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    os.environ[KEY_ENV] = ADMIN_KEY
    small = {"threads": 1, "ctx_size": 1024}
    upstream = start_server(model_dir, served_model_name="base", max_batch_size=2, **small)
    remote = {"url": upstream.base_url, "model": "base", "api_key_env": KEY_ENV}
    deployments = [
        {
            "model": "spill",
            "variants": [{"name": "v1", "weight": 1, "replicas": [{"local": "gw"}]}],
            "fallback": [remote],
        }
    ]
    # One sequence and no queue: a second request finds the local engine full (429).
    gateway = start_server(
        model_dir, served_model_name="gw", max_batch_size=1, max_queue=0,
        deployments=deployments, **small,
    )  # fmt: skip
    yield gateway, upstream
    gateway.stop()
    upstream.stop()
    os.environ.pop(KEY_ENV, None)


def chat(model: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return {**body, **fields}


def test_a_full_local_replica_hands_the_call_to_the_fallback(
    servers: tuple[LiveServer, LiveServer],
) -> None:
    gateway, upstream = servers
    long_stream = chat("gw", max_tokens=200, ignore_eos=True, stream=True)
    with httpx.Client(base_url=gateway.base_url, headers=gateway.headers, timeout=60) as client:
        # The engine's only sequence is busy: the gateway's own model refuses a second call.
        with client.stream("POST", "/v1/chat/completions", json=long_stream) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            refused = client.post("/v1/chat/completions", json=chat("gw"))
            assert refused.status_code == 429, refused.text
            answer = client.post("/v1/chat/completions", json=chat("spill"))
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "spill"
            assert answer.headers["x-aicc-variant"] == "v1"
            request_id = answer.headers["x-request-id"]
            for _ in lines:
                pass
        # The audit entry is committed before the answer's last byte.
        auditor = gateway.create_user_key("retry-auditor", ("auditor",))
        entries = client.get(
            "/admin/audit", params={"limit": 50}, headers={"Authorization": f"Bearer {auditor}"}
        ).json()["data"]
        (entry,) = [e for e in entries if e["request_id"] == request_id]
        assert entry["detail"]["replica"] == f"{upstream.base_url}#base"
        # Full is not broken: the local replica stays in service.
        data = client.get("/admin/deployments").json()["data"]
        spill = next(d for d in data if d["model"] == "spill")
        assert spill["variants"][0]["replicas"][0]["available"] is True
