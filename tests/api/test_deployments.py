"""Deployments through a real gateway: three aicc upstreams on loopback, weighted variants,
stickiness, the variant override, the variant in headers/metrics/audit, streams, hybrid
failover, broken upstreams, promote/rollback (API and CLI) and automatic rollback."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from aicc.cli.main import main
from tests.api.deploy_helpers import LoopThread, Relay
from tests.conftest import ADMIN_KEY, LiveServer, start_server
from tests.router.scripted import answer, hang, routes, sse_events, stream

KEY_ENV = "AICC_TEST_UPSTREAM_KEY"
UPSTREAM_MODEL = "base"
FAST = {"connect_s": 1.0, "first_byte_s": 1.5, "idle_s": 1.5, "total_s": 3.0, "check_s": 1.0}
OK_READY = answer("200 OK", "application/json", b'{"status":"ready"}')


def remote(url: str, **fields: Any) -> dict[str, Any]:
    return {"url": url, "model": UPSTREAM_MODEL, "api_key_env": KEY_ENV, **fields}


class Setup:
    def __init__(self, model_dir: Path) -> None:
        os.environ[KEY_ENV] = ADMIN_KEY
        small = {"threads": 1, "max_batch_size": 4, "ctx_size": 1024}
        self.loop = LoopThread()
        self.upstreams = [
            start_server(model_dir, served_model_name=UPSTREAM_MODEL, **small) for _ in range(3)
        ]
        a, b, c = (server.base_url for server in self.upstreams)
        self.relay = Relay(self.loop, int(a.rsplit(":", 1)[1]))
        self.relay.start()
        hung = self.loop.scripted(routes({"/readyz": hang}, hang))
        garbage = self.loop.scripted(
            routes({"/readyz": hang}, answer("200 OK", "application/json", b"<html>oops"))
        )
        chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
        cut = self.loop.scripted(
            routes({"/readyz": OK_READY}, stream(sse_events(chunk), then="close"))
        )
        usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1,
                                          "total_tokens": 10}}  # fmt: skip
        # OpenAI's last data chunk, then never its [DONE]: the client's end must not wait.
        silent_after_usage = self.loop.scripted(
            routes({"/readyz": OK_READY}, stream(sse_events(chunk, usage), then="hang"))
        )
        failing = self.loop.scripted(
            routes({"/readyz": OK_READY}, answer("500 Internal Server Error", "text/plain", b"x"))
        )
        deployments = [
            {"model": "split", "variants": [
                {"name": "v1", "weight": 90, "replicas": [remote(a), remote(b)]},
                {"name": "v2", "weight": 10, "replicas": [remote(c)]}]},
            {"model": "sticky", "sticky": "user", "variants": [
                {"name": "v1", "weight": 50, "replicas": [remote(a)]},
                {"name": "v2", "weight": 50, "replicas": [remote(c)]}]},
            {"model": "hybrid", "variants": [
                {"name": "v1", "weight": 1,
                 "replicas": [remote(f"http://127.0.0.1:{self.relay.port}", timeouts=FAST)]}],
             "fallback": [remote(c)]},
            {"model": "mixed", "variants": [
                {"name": "local", "weight": 50, "replicas": [{"local": "gateway-model"}]},
                {"name": "remote", "weight": 50, "replicas": [remote(b)]}]},
            {"model": "hung", "variants": [
                {"name": "v1", "weight": 1, "replicas": [remote(hung, timeouts=FAST)]}]},
            {"model": "garbage", "variants": [
                {"name": "v1", "weight": 1, "replicas": [remote(garbage, timeouts=FAST)]}]},
            {"model": "cut", "variants": [
                {"name": "v1", "weight": 1, "replicas": [remote(cut, timeouts=FAST)]}]},
            {"model": "usage-last", "variants": [
                {"name": "v1", "weight": 1,
                 "replicas": [remote(silent_after_usage, timeouts=FAST)]}]},
            {"model": "canary", "auto_rollback": {
                "baseline": "v1", "canary": "v2", "window_s": 60, "min_requests": 3},
             "variants": [
                {"name": "v1", "weight": 50, "replicas": [remote(b)]},
                {"name": "v2", "weight": 50, "replicas": [remote(failing)]}]},
        ]  # fmt: skip
        self.gateway = start_server(
            model_dir,
            served_model_name="gateway-model",
            deployments=deployments,
            health_check_s=0.5,
            replica_eject_s=1.0,
            **small,
        )
        self.client = httpx.Client(
            base_url=self.gateway.base_url, headers=self.gateway.headers, timeout=30
        )

    def close(self) -> None:
        self.client.close()
        for server in (self.gateway, *self.upstreams):
            server.stop()
        self.loop.close()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def setup(model_dir: Path) -> Iterator[Setup]:
    live = Setup(model_dir)
    yield live
    live.close()


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        **fields,
    }


def served_requests(server: LiveServer) -> float:
    metrics = server.app.state.metrics
    value = metrics.registry.get_sample_value(
        "aicc_requests_total",
        {"model": UPSTREAM_MODEL, "variant": "", "route": "/v1/chat/completions",
         "method": "POST", "status": "200"},
    )  # fmt: skip
    return value or 0.0


def replica_states(setup: Setup, model: str) -> dict[str, bool]:
    data = setup.client.get("/admin/deployments").json()["data"]
    deployment = next(d for d in data if d["model"] == model)
    replicas = [r for v in deployment["variants"] for r in v["replicas"]]
    return {r["id"]: r["available"] for r in replicas + deployment["fallback"]}


def test_weighted_split_and_least_loaded_replicas(setup: Setup) -> None:
    a, b, _ = setup.upstreams
    before = served_requests(a), served_requests(b)

    def one(_: int) -> str:
        response = setup.client.post("/v1/chat/completions", json=chat("split"))
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "split"
        return response.headers["x-aicc-variant"]

    with ThreadPoolExecutor(8) as pool:
        variants = Counter(pool.map(one, range(400)))
    assert set(variants) == {"v1", "v2"}
    assert 0.85 <= variants["v1"] / 400 <= 0.95, variants
    on_a, on_b = served_requests(a) - before[0], served_requests(b) - before[1]
    assert on_a + on_b == variants["v1"]
    assert min(on_a, on_b) >= 0.3 * variants["v1"], (on_a, on_b)


def test_sticky_user_keeps_each_user_on_one_variant(setup: Setup) -> None:
    seen: dict[str, set[str]] = {}
    for index in range(6):
        key = setup.gateway.create_user_key(f"sticky-{index}")
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(4):
            response = setup.client.post(
                "/v1/chat/completions", json=chat("sticky"), headers=headers
            )
            assert response.status_code == 200, response.text
            seen.setdefault(key, set()).add(response.headers["x-aicc-variant"])
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert {v for variants in seen.values() for v in variants} == {"v1", "v2"}


def test_variant_override_needs_the_permission(setup: Setup) -> None:
    for variant in ("v1", "v2", "v2"):
        response = setup.client.post(
            "/v1/chat/completions", json=chat("split"), headers={"X-AICC-Variant": variant}
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-aicc-variant"] == variant
    unknown = setup.client.post(
        "/v1/chat/completions", json=chat("split"), headers={"X-AICC-Variant": "v9"}
    )
    assert unknown.status_code == 400
    key = setup.gateway.create_user_key("plain-user")
    denied = setup.client.post(
        "/v1/chat/completions",
        json=chat("split"),
        headers={"Authorization": f"Bearer {key}", "X-AICC-Variant": "v2"},
    )
    assert denied.status_code == 403
    assert "inference:variant" in denied.json()["error"]["message"]


def test_variant_in_header_metrics_and_audit(setup: Setup) -> None:
    response = setup.client.post(
        "/v1/chat/completions",
        json=chat("split"),
        headers={"X-AICC-Variant": "v2", "X-Request-ID": "variant-audit-1"},
    )
    assert response.status_code == 200
    assert response.headers["x-aicc-variant"] == "v2"
    metrics = setup.client.get("/metrics").text
    assert (
        'aicc_requests_total{method="POST",model="split",route="/v1/chat/completions",'
        'status="200",variant="v2"}' in metrics
    )
    assert 'aicc_generation_tokens_total{model="split",variant="v2"}' in metrics
    auditor = setup.gateway.create_user_key("deploy-auditor", ("auditor",))
    entries = setup.client.get(
        "/admin/audit",
        params={"model": "split", "limit": 1000},
        headers={"Authorization": f"Bearer {auditor}"},
    )
    assert entries.status_code == 200, entries.text
    (entry,) = [e for e in entries.json()["data"] if e["request_id"] == "variant-audit-1"]
    assert entry["detail"]["variant"] == "v2"
    assert entry["detail"]["replica"].endswith("#base")
    assert entry["completion_tokens"] == 1


def test_stream_through_the_gateway_is_metered(setup: Setup) -> None:
    metrics = setup.gateway.app.state.metrics
    labels = {"model": "split", "variant": "v1"}
    before = metrics.registry.get_sample_value("aicc_generation_tokens_total", labels) or 0
    body = chat("split", max_tokens=5, stream=True, stream_options={"include_usage": True})
    with setup.client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"X-AICC-Variant": "v1"}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-aicc-variant"] == "v1"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"split"}  # the public name, not upstream's
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] >= 1
    # The gateway observes a call once its last byte is sent: just after the client has it.
    deadline = time.monotonic() + 5
    expected = before + usage["completion_tokens"]
    while metrics.registry.get_sample_value("aicc_generation_tokens_total", labels) != expected:
        assert time.monotonic() < deadline, "the stream's tokens were not metered"
        time.sleep(0.05)


def test_local_replica_serves_under_the_public_name(setup: Setup) -> None:
    response = setup.client.post(
        "/v1/chat/completions", json=chat("mixed"), headers={"X-AICC-Variant": "local"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "mixed"
    assert response.headers["x-aicc-variant"] == "local"
    models = {card["id"] for card in setup.client.get("/v1/models").json()["data"]}
    assert {"split", "mixed", "gateway-model"} <= models


def test_hybrid_failover_and_return(setup: Setup) -> None:
    relay_id = f"http://127.0.0.1:{setup.relay.port}#base"
    assert setup.client.post("/v1/chat/completions", json=chat("hybrid")).status_code == 200
    setup.relay.stop()
    stopped = time.monotonic()
    failed_over_in = None
    while time.monotonic() - stopped < 15:
        response = setup.client.post("/v1/chat/completions", json=chat("hybrid"))
        if response.status_code == 200:
            failed_over_in = time.monotonic() - stopped
            break
    assert failed_over_in is not None
    assert failed_over_in < 15
    deadline = time.monotonic() + 10
    while replica_states(setup, "hybrid")[relay_id] and time.monotonic() < deadline:
        setup.client.post("/v1/chat/completions", json=chat("hybrid"))
    assert replica_states(setup, "hybrid")[relay_id] is False
    setup.relay.start()  # the same port
    deadline = time.monotonic() + 15
    while not replica_states(setup, "hybrid")[relay_id]:
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(0.2)


@pytest.mark.parametrize(("model", "status"), [("hung", 504), ("garbage", 502)])
def test_broken_upstream_gives_a_clean_error_and_is_ejected(
    setup: Setup, model: str, status: int
) -> None:
    replica_id = next(iter(replica_states(setup, model)))
    for _ in range(3):
        started = time.monotonic()
        response = setup.client.post("/v1/chat/completions", json=chat(model))
        assert time.monotonic() - started < 5
        if response.status_code == 503:  # ejected already (the checks fail too)
            assert response.headers["retry-after"]
            break
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] in ("upstream_timeout", "upstream_error")
        assert response.headers["x-aicc-variant"] == "v1"
    assert replica_states(setup, model)[replica_id] is False


def test_upstream_closing_mid_stream_ends_the_stream_cleanly(setup: Setup) -> None:
    started = time.monotonic()
    with setup.client.stream("POST", "/v1/chat/completions", json=chat("cut", stream=True)) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started < 5
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "upstream_error"


def test_stream_ends_after_the_usage_chunk_and_its_commit(setup: Setup) -> None:
    """The upstream sends its usage chunk and then nothing (its [DONE] would come after its
    own audit commit): the client's stream ends with the gateway's [DONE] at once, audited
    with the usage; the upstream's silence afterwards fails only its replica."""
    started = time.monotonic()
    with setup.client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat("usage-last", stream=True),
        headers={"X-Request-ID": "usage-last-1"},
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert time.monotonic() - started < FAST["idle_s"]  # not the upstream's idle timeout
    assert events[-1] == "[DONE]"
    (chunk,) = [json.loads(event) for event in events[:-1]]  # the usage it did not ask for
    assert chunk["choices"][0]["delta"]["content"] == "Hi"  # is dropped again
    auditor = setup.gateway.create_user_key("usage-auditor", ("auditor",))
    entries = setup.client.get(
        "/admin/audit",
        params={"model": "usage-last", "limit": 100},
        headers={"Authorization": f"Bearer {auditor}"},
    ).json()["data"]
    (entry,) = [e for e in entries if e["request_id"] == "usage-last-1"]
    assert (entry["status"], entry["prompt_tokens"], entry["completion_tokens"]) == (200, 9, 1)
    # The rest of the upstream's stream is read after the client's end, within its timeouts.
    router = setup.gateway.app.state.router
    deadline = time.monotonic() + 5
    while router.outstanding.num_outstanding(next(iter(replica_states(setup, "usage-last")))):
        assert time.monotonic() < deadline, "the upstream's rest was not given up"
        time.sleep(0.05)


def run_cli(setup: Setup, *args: str) -> str:
    env = {"AICC_SERVER": setup.gateway.base_url, "AICC_API_KEY": ADMIN_KEY}
    result = CliRunner(env=env).invoke(main, ["deploy", *args])
    assert result.exit_code == 0, result.output
    return result.output


def variants_of(setup: Setup, num: int = 10) -> set[str]:
    return {
        setup.client.post("/v1/chat/completions", json=chat("split")).headers["x-aicc-variant"]
        for _ in range(num)
    }


def test_promote_and_rollback_via_api_and_cli(setup: Setup) -> None:
    promoted = setup.client.post("/admin/deployments/split/promote", json={"variant": "v2"})
    assert promoted.json()["weights"] == {"v1": 0.0, "v2": 100.0}
    assert variants_of(setup) == {"v2"}
    assert "split: v1=100, v2=0" in run_cli(setup, "rollback", "split")
    assert variants_of(setup) == {"v1"}
    run_cli(setup, "weights", "split", "v1=90", "v2=10")
    assert "split" in run_cli(setup, "list")
    user = setup.gateway.create_user_key("not-a-deployer")
    denied = setup.client.post(
        "/admin/deployments/split/promote",
        json={"variant": "v2"},
        headers={"Authorization": f"Bearer {user}"},
    )
    assert denied.status_code == 403
    bad = setup.client.post("/admin/deployments/split/weights", json={"weights": {"v9": 1}})
    assert bad.status_code == 400


def test_auto_rollback_of_a_failing_canary(setup: Setup) -> None:
    deadline = time.monotonic() + 20
    while True:
        for _ in range(4):
            setup.client.post("/v1/chat/completions", json=chat("canary"))
        data = setup.client.get("/admin/deployments").json()["data"]
        canary = next(d for d in data if d["model"] == "canary")
        weights = {v["name"]: v["weight"] for v in canary["variants"]}
        if weights == {"v1": 100.0, "v2": 0.0}:
            break
        assert time.monotonic() < deadline, weights
        time.sleep(0.5)
    responses = [setup.client.post("/v1/chat/completions", json=chat("canary")) for _ in range(5)]
    assert all(r.status_code == 200 for r in responses)
