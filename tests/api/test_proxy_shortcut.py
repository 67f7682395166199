"""The short way for remote-only deployments (`aicc.api.fastproxy`): taken only for them, and
answering exactly as the routes do — errors, headers, metrics and audit alike."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aicc.api.fastproxy import ProxyShortcut
from tests.conftest import ADMIN_KEY, LiveServer, start_server

ROUTE = "/v1/chat/completions"
KEY_ENV = "AICC_TEST_SHORTCUT_KEY"


@pytest.fixture(scope="module")
def servers(model_dir: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    small = {"threads": 1, "max_batch_size": 2, "ctx_size": 1024}
    upstream = start_server(model_dir, served_model_name="base", **small)
    os.environ[KEY_ENV] = ADMIN_KEY
    replica = {"url": upstream.base_url, "model": "base", "api_key_env": KEY_ENV}
    deployments = [
        {"model": "remote", "variants": [{"name": "v1", "weight": 1, "replicas": [replica]}]},
        {"model": "mixed", "variants": [
            {"name": "here", "weight": 1, "replicas": [{"local": "gateway-model"}]},
            {"name": "there", "weight": 0, "replicas": [replica]}]},
    ]  # fmt: skip
    gateway = start_server(
        model_dir, served_model_name="gateway-model", deployments=deployments, **small
    )
    yield gateway, upstream
    gateway.stop()
    upstream.stop()
    os.environ.pop(KEY_ENV, None)


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The models of the calls that went the short way."""
    models: list[str] = []
    original = ProxyShortcut._respond

    async def spy(self: ProxyShortcut, request: Any, router: Any, model: str, path: str) -> Any:
        models.append(model)
        return await original(self, request, router, model, path)

    monkeypatch.setattr(ProxyShortcut, "_respond", spy)
    return models


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            **fields}  # fmt: skip


def post(server: LiveServer, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else server.headers
    return httpx.post(server.base_url + ROUTE, json=body, headers=headers, timeout=60)


def test_only_remote_only_deployments_take_it(
    servers: tuple[LiveServer, LiveServer], taken: list[str]
) -> None:
    gateway, _ = servers
    for stream in (False, True):
        answer = post(gateway, chat("remote", stream=stream))
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-aicc-variant"] == "v1"
    assert answer.text.rstrip().endswith("data: [DONE]")
    assert '"model":"remote"' in answer.text
    assert post(gateway, chat("mixed")).headers["x-aicc-variant"] == "here"
    assert post(gateway, chat("gateway-model")).status_code == 200
    assert taken == ["remote", "remote"]


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": "hello"},
        {"max_tokens": 0},
        {"temperature": "hot"},
        {"messages": [{"role": "nobody", "content": "x"}]},
    ],
)
def test_bad_bodies_get_the_routes_answer(
    servers: tuple[LiveServer, LiveServer], taken: list[str], fields: dict[str, Any]
) -> None:
    gateway, _ = servers
    short = post(gateway, chat("remote", **fields))
    routed = post(gateway, chat("gateway-model", **fields))
    assert taken == ["remote"]
    assert short.status_code == routed.status_code == 400
    assert short.json() == routed.json()


def test_credentials_and_permissions_are_checked_the_same(
    servers: tuple[LiveServer, LiveServer], taken: list[str]
) -> None:
    gateway, _ = servers
    reader = gateway.create_user_key("no-inference", roles=("auditor",))
    for key, status in ((f"aicc-sk-{'x' * 24}", 401), (reader, 403)):
        short = post(gateway, chat("remote"), key)
        routed = post(gateway, chat("gateway-model"), key)
        assert short.status_code == routed.status_code == status
        assert short.json()["error"]["type"] == routed.json()["error"]["type"]
    assert taken == ["remote", "remote"]


def test_bodies_it_cannot_take_go_to_the_app(
    servers: tuple[LiveServer, LiveServer], taken: list[str]
) -> None:
    gateway, _ = servers
    headers = {**gateway.headers, "Content-Type": "application/json"}
    broken = httpx.post(gateway.base_url + ROUTE, content=b'{"model": "remote",', headers=headers)
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    assert post(gateway, ["not", "an", "object"]).status_code == 400
    assert taken == []


def test_metrics_and_audit_see_the_route(
    servers: tuple[LiveServer, LiveServer], taken: list[str]
) -> None:
    gateway, _ = servers
    answer = post(gateway, chat("remote"))
    assert answer.status_code == 200

    def count() -> float:  # counted just after the last byte: wait for it
        text = httpx.get(gateway.base_url + "/metrics", headers=gateway.headers).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "aicc_requests_total"
            and sample.labels.get("route") == ROUTE
            and sample.labels.get("model") == "remote"
            and sample.labels.get("variant") == "v1"
        )

    deadline = time.monotonic() + 5
    while count() < 1:
        assert time.monotonic() < deadline, "the call was not counted"
        time.sleep(0.05)
    auditor = gateway.create_user_key("auditor", roles=("auditor",))
    entries = httpx.get(
        gateway.base_url + "/admin/audit",
        params={"model": "remote", "limit": 500},
        headers={"Authorization": f"Bearer {auditor}"},
    ).json()["data"]
    mine = [e for e in entries if e["request_id"] == answer.headers["x-request-id"]]
    assert len(mine) == 1
    assert mine[0]["detail"]["variant"] == "v1"
    assert mine[0]["route"] == ROUTE
    assert taken == ["remote"]
