"""`aicc serve --workers 2` end to end on loopback: the gateway's lifespan starts two real
engine workers and routes its model to them; a worker killed with SIGKILL under load costs no
request that had not streamed, is restarted, and readiness follows the workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aicc.api.state import WorkerModels
from aicc.errors import ConfigError
from aicc.router.service import TENANT_HEADER, Router
from aicc.router.settings import DeploymentSettings
from aicc.router.workers import WorkerState, WorkerSupervisor
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer, start_server

PROMPT = "Count slowly from one to twenty, one number per line."


@dataclass
class Gateway:
    live: LiveServer

    @property
    def supervisor(self) -> WorkerSupervisor:
        return self.live.workers

    @property
    def router(self) -> Router:
        return self.live.router

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.live.api_key}"}
        return httpx.Client(base_url=self.live.base_url, headers=headers, timeout=60)

    def worker_metric(self, replica_id: str, name: str, **labels: str) -> float:
        """The sum of one metric's samples on one worker (read with the workers' token)."""
        url = next(r.url for r in self.supervisor.replicas() if r.id == replica_id)
        headers = {"Authorization": f"Bearer {self.supervisor.token}"}
        text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
        return metric_sum(text, name, **labels)


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def chat_body(*, stream: bool = False, max_tokens: int = 4, prompt: str = PROMPT) -> dict[str, Any]:
    return {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # exactly max_tokens tokens: the token counters can be checked
        "stream": stream,
    }


@pytest.fixture(scope="module")
def gateway(model_dir: Path) -> Iterator[Gateway]:
    """Two workers of one thread each; a crashed worker is restarted after 1 s."""
    live = start_server(
        model_dir, workers=2, threads=2, max_batch_size=4, ctx_size=2048,
        worker_restart_max_s=1.0, log_level="warning",
    )  # fmt: skip
    try:
        yield Gateway(live)
    finally:
        live.stop()
    assert live.app.state.workers is None


def test_lifespan_runs_workers_and_loads_no_model(gateway: Gateway) -> None:
    app = gateway.live.app
    assert isinstance(app.state.workers, WorkerSupervisor)
    assert gateway.supervisor.num_ready == 2
    assert gateway.supervisor.threads_per_worker == 1
    assert app.state.engine is None  # nothing loaded in the gateway's process
    assert isinstance(app.state.pool, WorkerModels)
    with gateway.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "workers_ready": 2}
        models = client.get("/v1/models").json()
        assert [card["id"] for card in models["data"]] == [BUNDLED_MODEL_NAME]
        assert client.get(f"/v1/models/{BUNDLED_MODEL_NAME}").status_code == 200
        missing = client.post("/v1/chat/completions", json={**chat_body(), "model": "other"})
        assert missing.status_code == 404
        assert BUNDLED_MODEL_NAME in missing.json()["error"]["message"]
        assert client.get("/v1/models/other").status_code == 404
        embedded = client.post("/v1/embeddings", json={"model": BUNDLED_MODEL_NAME, "input": "hi"})
        assert embedded.status_code == 200, embedded.text
        assert embedded.headers["x-aicc-variant"] == "workers"
        tokens = client.post("/tokenize", json={"model": BUNDLED_MODEL_NAME, "content": "hi"})
        assert tokens.status_code == 404  # a gateway-local route: no engine in this process
        assert "engine workers" in tokens.json()["error"]["message"]
    [deployment] = gateway.router.describe()
    assert deployment["model"] == BUNDLED_MODEL_NAME
    replicas = deployment["variants"][0]["replicas"]
    assert [(r["id"], r["kind"], r["available"]) for r in replicas] == [
        ("worker-0", "worker", True),
        ("worker-1", "worker", True),
    ]


def test_both_workers_serve_and_the_gateway_measures(gateway: Gateway) -> None:
    route = "/v1/chat/completions"
    before = {
        r.id: gateway.worker_metric(r.id, "aicc_requests_total", route=route, status="200")
        for r in gateway.supervisor.replicas()
    }

    def call(index: int) -> httpx.Response:
        with gateway.client() as client:
            return client.post(route, json=chat_body(stream=index % 2 == 1))

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.headers["x-aicc-variant"] == "workers" for r in responses)
    answer = responses[0].json()
    assert answer["model"] == BUNDLED_MODEL_NAME
    assert answer["usage"]["completion_tokens"] == 4
    assert responses[1].text.rstrip().endswith("data: [DONE]")
    for replica_id, count in before.items():
        after = gateway.worker_metric(replica_id, "aicc_requests_total", route=route, status="200")
        assert after > count, f"{replica_id} got no traffic"
    with gateway.client() as client:
        text = client.get("/metrics").text
    labels = {"model": BUNDLED_MODEL_NAME, "variant": "workers"}
    assert metric_sum(text, "aicc_requests_total", route=route, status="200", **labels) >= 8
    assert metric_sum(text, "aicc_generation_tokens_total", **labels) >= 32


def test_the_gateway_sets_the_tenant_never_the_client(gateway: Gateway) -> None:
    """Alice's prompt is cached on both workers; Bob, naming Alice's tenant in the header,
    still gets no cached token of hers: the workers see the gateway's tenant for Bob."""
    bob = gateway.live.create_user_key("tenant-bob")
    alice_tenant = "user:1"  # the bootstrap admin: the first user of a fresh database
    body = chat_body(prompt=" ".join(f"word{i}" for i in range(150)))
    workers = gateway.supervisor.replicas()

    def hits() -> float:
        return sum(
            gateway.worker_metric(w.id, "aicc_prefix_cache_hit_tokens_total") for w in workers
        )

    with gateway.client() as alice:
        for _ in workers:  # one each (ties go round-robin): both cache it
            assert alice.post("/v1/chat/completions", json=body).is_success
    before = hits()
    with gateway.client(bob) as client:
        forged = {TENANT_HEADER: alice_tenant}
        answer = client.post("/v1/chat/completions", json=body, headers=forged)
        assert answer.status_code == 200, answer.text
    assert hits() == before  # no hit on Alice's cache
    # The header, had it reached a worker, would have hit: Alice's tenant is the one named.
    headers = {"Authorization": f"Bearer {gateway.supervisor.token}", TENANT_HEADER: alice_tenant}
    direct = httpx.post(workers[0].url + "/v1/chat/completions", json=body, headers=headers)
    assert direct.status_code == 200, direct.text
    assert hits() > before


@dataclass
class ReadinessWatch:
    """Polls /readyz in a thread; the statuses seen."""

    url: str
    statuses: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> ReadinessWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                self.statuses.append(client.get(self.url + "/readyz").status_code)
                time.sleep(0.02)


@dataclass
class Outcome:
    status: int
    is_complete: bool
    num_chunks_before_error: int | None
    """Streams only: content chunks received before an error event (None: no error)."""


def call_once(gateway: Gateway, stream: bool) -> Outcome:
    with gateway.client() as client:
        response = client.post("/v1/chat/completions", json=chat_body(stream=stream))
    if not stream or response.status_code != 200:
        complete = response.status_code == 200 and bool(response.json()["choices"])
        return Outcome(response.status_code, complete, None)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    num_chunks = 0
    for data in events:
        if data == "[DONE]":
            break
        if "error" in json.loads(data):
            return Outcome(200, False, num_chunks)
        num_chunks += 1
    return Outcome(200, events[-1:] == ["[DONE]"] and num_chunks > 0, None)


def test_kill_one_worker_under_load(gateway: Gateway) -> None:
    victim = next(r for r in gateway.supervisor.replicas() if r.id == "worker-0")
    assert victim.pid is not None
    assert victim.num_restarts == 0
    with ReadinessWatch(gateway.live.base_url) as watch, ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(call_once, gateway, i % 2 == 1) for i in range(20)]
        wait_until(
            lambda: gateway.router.outstanding.num_outstanding("worker-0") >= 3, 30,
            "worker-0 has requests in flight",
        )  # fmt: skip
        os.kill(victim.pid, signal.SIGKILL)
        outcomes = [future.result(timeout=120) for future in futures]
        wait_until(lambda: gateway.supervisor.num_ready == 2, 60, "worker-0 is ready again")
    assert all(o.status == 200 for o in outcomes), outcomes
    # A whole answer (the request was retried on worker-1), or a stream that had already
    # streamed when its worker died: it ends with an error event after its first chunks.
    for outcome in outcomes:
        assert outcome.is_complete or (outcome.num_chunks_before_error or 0) > 0, outcome
    restarted = next(r for r in gateway.supervisor.replicas() if r.id == "worker-0")
    assert restarted.num_restarts == 1
    assert restarted.state is WorkerState.READY
    assert restarted.pid != victim.pid
    assert gateway.router.is_in_service("worker-0")
    assert watch.statuses
    assert set(watch.statuses) == {200}
    with gateway.client() as client:  # the restarted worker serves again
        assert all(client.post("/v1/chat/completions", json=chat_body()).is_success
                   for _ in range(2))  # fmt: skip


def test_both_workers_killed_readiness_fails_until_one_is_back(gateway: Gateway) -> None:
    pids = [r.pid for r in gateway.supervisor.replicas()]
    with gateway.client() as client:
        for pid in pids:
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: client.get("/readyz").status_code == 503, 5, "/readyz turns 503")
        refused = client.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "no_replica_available"
        assert refused.headers["retry-after"] == "1"
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "/readyz back to 200")
        wait_until(lambda: gateway.supervisor.num_ready == 2, 60, "both workers ready")
        assert client.post("/v1/chat/completions", json=chat_body()).is_success


def test_a_replica_of_another_local_model_stops_start_up(gateway: Gateway) -> None:
    variant = {"name": "a", "weight": 1, "replicas": [{"local": "other"}]}
    deployment = DeploymentSettings.model_validate({"model": "chat", "variants": [variant]})
    router = Router.from_settings(
        [deployment], health_check_s=1.0, eject_s=1.0, retry_after_s=1, database=None
    )
    with pytest.raises(ConfigError, match="loads no model in-process"):
        router.serve_workers(BUNDLED_MODEL_NAME, gateway.supervisor)
    asyncio.run(router.close())


def test_the_workers_model_as_a_local_replica_stands_for_every_worker(gateway: Gateway) -> None:
    local = {"local": BUNDLED_MODEL_NAME}
    remote = {"url": "http://127.0.0.1:9", "model": "m"}
    deployment = DeploymentSettings.model_validate(
        {
            "model": "chat",
            "variants": [
                {"name": "local", "weight": 3, "replicas": [local, remote]},
                {"name": "remote", "weight": 1, "replicas": [remote]},
            ],
            "fallback": [remote, local],
        }
    )
    router = Router.from_settings(
        [deployment], health_check_s=1.0, eject_s=1.0, retry_after_s=1, database=None
    )
    unsubscribe = router.serve_workers(BUNDLED_MODEL_NAME, gateway.supervisor)
    workers = [r.id for r in gateway.supervisor.replicas()]
    spec = router.deployments["chat"].spec
    assert spec.variants[0].replicas == (*workers, "http://127.0.0.1:9#m")
    assert spec.variants[1].replicas == ("http://127.0.0.1:9#m",)
    assert router.deployments["chat"].fallback == ("http://127.0.0.1:9#m", *workers)
    assert f"local:{BUNDLED_MODEL_NAME}" not in router.replicas
    assert router.deployments[BUNDLED_MODEL_NAME].spec.variants[0].replicas == tuple(workers)
    unsubscribe()
    asyncio.run(router.close())
