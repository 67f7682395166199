"""Hybrid deployments end to end on loopback: one gateway with two engine workers and a
remote aicc in one deployment (`local` 3 : `remote` 1, the remote also the fallback).
Weighted split, stickiness, the variant override, the variant in headers/metrics/audit,
a worker killed under load, and failover to the remote while every worker is down."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aicc.router.service import Router
from aicc.router.workers import WorkerState, WorkerSupervisor
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.api.test_workers_gateway import ReadinessWatch, metric_sum, wait_until
from tests.conftest import ADMIN_KEY, LiveServer, start_server

ROUTE = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
"""The split's route: a 2-token prompt (chat's template makes 10), so 400 calls stay cheap."""
NUM_SPLIT = 400
SEED = 7
"""The router's RNG for the split: the realised share of a fair 3:1 draw of 400 is within
±5 points only ~98% of the time, so an unseeded run would fail now and then by chance."""


@dataclass
class Hybrid:
    gateway: LiveServer
    remote: LiveServer
    auditor_key: str

    @property
    def supervisor(self) -> WorkerSupervisor:
        return self.gateway.workers

    @property
    def router(self) -> Router:
        return self.gateway.router

    @property
    def remote_id(self) -> str:
        return f"{self.remote.base_url}#{BUNDLED_MODEL_NAME}"

    def client(self, key: str = ADMIN_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.gateway.base_url, headers=headers, timeout=60)

    def served(self, route: str = ROUTE) -> dict[str, float]:
        """Calls of `route` answered 200 by each worker and by the remote, by their own
        metrics."""
        counts = {}
        for worker in self.supervisor.replicas():
            headers = {"Authorization": f"Bearer {self.supervisor.token}"}
            text = httpx.get(worker.url + "/metrics", headers=headers, timeout=30).text
            counts[worker.id] = metric_sum(text, "aicc_requests_total", route=route, status="200")
        text = httpx.get(self.remote.base_url + "/metrics", headers=self.remote.headers).text
        counts["remote"] = metric_sum(text, "aicc_requests_total", route=route, status="200")
        return counts

    def gateway_calls(self, model: str, variant: str, route: str = ROUTE) -> float:
        text = httpx.get(self.gateway.base_url + "/metrics", headers=self.gateway.headers).text
        labels = {"model": model, "variant": variant, "route": route, "status": "200"}
        return metric_sum(text, "aicc_requests_total", **labels)

    def audit_entries(self, model: str) -> dict[str, dict[str, Any]]:
        """The gateway's audit entries of calls to `model`, by request id."""
        entries: dict[str, dict[str, Any]] = {}
        after: int | None = None
        with self.client(self.auditor_key) as client:
            while True:
                params: dict[str, Any] = {"model": model, "limit": 1000}
                if after is not None:
                    params["after_seq"] = after
                page = client.get("/admin/audit", params=params)
                assert page.status_code == 200, page.text
                entries.update((e["request_id"], e) for e in page.json()["data"])
                after = page.json()["next_after_seq"]
                if after is None:
                    return entries


def deployment(model: str, remote: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "variants": [
            {"name": "local", "weight": 3, "replicas": [{"local": BUNDLED_MODEL_NAME}]},
            {"name": "remote", "weight": 1, "replicas": [remote]},
        ],
        "fallback": [remote],
        **fields,
    }


@pytest.fixture(scope="module")
def hybrid(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hybrid]:
    """Workers restart after 1 s; the remote is another aicc, reached with a key file (its
    own audit log is off: the gateway's is the one under test)."""
    remote = start_server(
        model_dir, threads=1, max_batch_size=4, ctx_size=1024, audit_enabled=False
    )
    key_file = tmp_path_factory.mktemp("hybrid") / "remote.key"
    key_file.write_text(ADMIN_KEY + "\n")
    upstream = {"url": remote.base_url, "model": BUNDLED_MODEL_NAME, "api_key_file": key_file}
    try:
        gateway = start_server(
            model_dir, workers=2, threads=2, max_batch_size=4, ctx_size=1024,
            worker_restart_max_s=1.0, health_check_s=0.5, replica_eject_s=1.0,
            log_level="warning",
            deployments=[
                deployment("chat", upstream),
                deployment("chat-sticky", upstream, sticky="header"),
            ],
        )  # fmt: skip
    except BaseException:
        remote.stop()
        raise
    try:
        auditor = gateway.create_user_key("hybrid-auditor", ("auditor",))
        yield Hybrid(gateway, remote, auditor)
    finally:
        gateway.stop()
        remote.stop()


def chat(model: str = "chat", *, max_tokens: int = 1, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


@dataclass
class Split:
    variants: dict[str, str]
    """Request id → the `x-aicc-variant` of its answer."""
    served: dict[str, float]
    """Calls each worker and the remote answered meanwhile."""
    calls_before: dict[str, float]
    """The gateway's `aicc_requests_total` per variant before."""


@pytest.fixture(scope="module")
def split(hybrid: Hybrid) -> Split:
    """400 one-token completions of `chat`, 8 at a time."""
    hybrid.router._rng = random.Random(SEED)  # the router's own RNG (see SEED)
    before = hybrid.served(COMPLETIONS)
    calls_before = {v: hybrid.gateway_calls("chat", v, COMPLETIONS) for v in ("local", "remote")}
    body = {"model": "chat", "prompt": "Hi", "max_tokens": 1}

    def one(index: int) -> tuple[str, str]:
        request_id = f"hybrid-split-{index}"
        with hybrid.client() as client:
            response = client.post(COMPLETIONS, json=body, headers={"X-Request-ID": request_id})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "chat"
        return request_id, response.headers["x-aicc-variant"]

    with ThreadPoolExecutor(8) as pool:
        variants = dict(pool.map(one, range(NUM_SPLIT)))
    after = hybrid.served(COMPLETIONS)
    served = {name: after[name] - before[name] for name in after}
    return Split(variants, served, calls_before)


def test_traffic_splits_by_weight_onto_both_workers_and_the_remote(split: Split) -> None:
    counts = Counter(split.variants.values())
    assert set(counts) == {"local", "remote"}
    assert abs(counts["local"] / NUM_SPLIT - 0.75) <= 0.05, counts
    # What each upstream itself answered agrees with the headers: no call went astray.
    assert split.served["worker-0"] + split.served["worker-1"] == counts["local"], split.served
    assert split.served["remote"] == counts["remote"], split.served
    # Least outstanding requests spreads the local share over both workers.
    assert min(split.served["worker-0"], split.served["worker-1"]) >= 0.3 * counts["local"]


def test_the_variant_labels_metrics_and_audit(hybrid: Hybrid, split: Split) -> None:
    counts = Counter(split.variants.values())
    expected = {v: split.calls_before[v] + counts[v] for v in ("local", "remote")}
    # The gateway observes a call just after its last byte has gone out.
    wait_until(
        lambda: {v: hybrid.gateway_calls("chat", v, COMPLETIONS) for v in expected} == expected,
        5,
        f"the gateway's metrics count {expected}",
    )
    entries = hybrid.audit_entries("chat")
    workers = {"worker-0", "worker-1"}
    for request_id, variant in split.variants.items():
        detail = entries[request_id]["detail"]
        assert detail["variant"] == variant, (request_id, detail)
        if variant == "local":
            assert detail["replica"] in workers, detail
        else:
            assert detail["replica"] == hybrid.remote_id, detail


def test_a_sticky_header_keeps_its_variant(hybrid: Hybrid) -> None:
    seen: dict[str, set[str]] = {}
    with hybrid.client() as client:
        for session in [f"session-{n}" for n in range(8)] + ["session-0"] * 16:
            headers = {"x-aicc-session": session}
            response = client.post(ROUTE, json=chat("chat-sticky"), headers=headers)
            assert response.status_code == 200, response.text
            seen.setdefault(session, set()).add(response.headers["x-aicc-variant"])
    assert all(len(variants) == 1 for variants in seen.values()), seen
    assert {v for variants in seen.values() for v in variants} == {"local", "remote"}, seen


def test_the_variant_header_needs_the_permission(hybrid: Hybrid) -> None:
    plain = hybrid.gateway.create_user_key("hybrid-plain")
    role = {"name": "variant-tester", "permissions": ["inference", "inference:variant"],
            "models": ["*"]}  # fmt: skip
    with hybrid.client() as admin:
        assert admin.post("/admin/roles", json=role).status_code == 201
    tester = hybrid.gateway.create_user_key("hybrid-tester", ("variant-tester",))
    with hybrid.client(plain) as client:
        denied = client.post(ROUTE, json=chat(), headers={"x-aicc-variant": "remote"})
        assert denied.status_code == 403
        assert "inference:variant" in denied.json()["error"]["message"]
        assert client.post(ROUTE, json=chat()).status_code == 200  # without the header
    before = hybrid.served()
    with hybrid.client(tester) as client:
        for variant in ("remote", "local", "remote"):
            response = client.post(ROUTE, json=chat(), headers={"x-aicc-variant": variant})
            assert response.status_code == 200, response.text
            assert response.headers["x-aicc-variant"] == variant
    after = hybrid.served()
    assert after["remote"] - before["remote"] == 2
    assert sum(after[w] - before[w] for w in ("worker-0", "worker-1")) == 1


@dataclass
class Outcome:
    status: int
    is_complete: bool
    has_streamed: bool
    """Content reached the client before an error event."""


def call(hybrid: Hybrid, stream: bool) -> Outcome:
    with hybrid.client() as client:
        response = client.post(
            ROUTE, json=chat(max_tokens=8, stream=stream), headers={"x-aicc-variant": "local"}
        )
    if response.status_code != 200 or not stream:
        return Outcome(response.status_code, response.status_code == 200, False)
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    num_chunks = 0
    for data in events:
        if data == "[DONE]":
            break
        if "error" in json.loads(data):
            return Outcome(200, False, num_chunks > 0)
        num_chunks += 1
    return Outcome(200, events[-1:] == ["[DONE]"] and num_chunks > 0, num_chunks > 0)


def workers_ready(hybrid: Hybrid) -> int:
    ready: int = httpx.get(hybrid.gateway.base_url + "/readyz").json()["workers_ready"]
    return ready


def test_kill_one_worker_under_load(hybrid: Hybrid) -> None:
    victim = next(r for r in hybrid.supervisor.replicas() if r.id == "worker-0")
    assert victim.pid is not None
    restarts = victim.num_restarts
    with ReadinessWatch(hybrid.gateway.base_url) as watch, ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(call, hybrid, i % 2 == 1) for i in range(20)]
        wait_until(
            lambda: hybrid.router.outstanding.num_outstanding("worker-0") >= 3, 30,
            "worker-0 has requests in flight",
        )  # fmt: skip
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: workers_ready(hybrid) == 1, 5, "/readyz counts one worker ready")
        outcomes = [future.result(timeout=120) for future in futures]
        wait_until(lambda: hybrid.supervisor.num_ready == 2, 60, "worker-0 is ready again")
    # Whole answers (retried on worker-1 or the remote), or streams cut after their first bytes.
    assert all(o.status == 200 for o in outcomes), outcomes
    assert all(o.is_complete or o.has_streamed for o in outcomes), outcomes
    restarted = next(r for r in hybrid.supervisor.replicas() if r.id == "worker-0")
    assert restarted.num_restarts == restarts + 1
    assert restarted.state is WorkerState.READY
    assert restarted.pid != victim.pid
    assert watch.statuses
    assert set(watch.statuses) == {200}  # worker-1 kept serving: ready throughout


def test_every_worker_killed_fails_over_to_the_remote_and_back(hybrid: Hybrid) -> None:
    """Calls that choose `local` go to the fallback while no worker is in service. (A call
    routed in the instant before the gateway sees the exits waits in the port's backlog
    for the restarted worker instead; hence the wait for the exits before the first call.)"""
    workers = hybrid.supervisor.replicas()
    assert hybrid.supervisor.num_ready == 2
    local = {"x-aicc-variant": "local"}
    outcomes: list[tuple[float, int, str]] = []
    """(seconds since the kill, status, request id)"""
    with hybrid.client() as client:
        for worker in workers:
            os.kill(worker.pid or 0, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda: not any(hybrid.router.is_in_service(w.id) for w in workers), 5,
            "the gateway takes the workers out of service",
        )  # fmt: skip
        # The fallback serves the workers' calls: the gateway stays ready.
        readiness = httpx.get(hybrid.gateway.base_url + "/readyz")
        assert readiness.status_code == 200, readiness.text
        assert readiness.json()["workers_ready"] == 0
        while len(outcomes) < 10:
            request_id = f"hybrid-failover-{len(outcomes)}"
            headers = {**local, "X-Request-ID": request_id}
            response = client.post(ROUTE, json=chat(), headers=headers)
            outcomes.append((time.monotonic() - killed, response.status_code, request_id))
        wait_until(lambda: hybrid.supervisor.num_ready == 2, 60, "both workers ready again")
        before = hybrid.served()
        returned = [client.post(ROUTE, json=chat(), headers=local) for _ in range(4)]
    assert [status for _, status, _ in outcomes] == [200] * 10, outcomes
    assert outcomes[0][0] < 15
    entries = hybrid.audit_entries("chat")
    first = entries[outcomes[0][2]]["detail"]
    assert first == {"variant": "local", "replica": hybrid.remote_id}
    # Back: `local` calls land on the workers again.
    assert all(r.status_code == 200 for r in returned)
    assert {r.headers["x-aicc-variant"] for r in returned} == {"local"}
    after = hybrid.served()
    assert sum(after[w.id] - before[w.id] for w in workers) == 4
    assert after["remote"] == before["remote"]


def test_calls_waiting_on_dead_workers_are_retried_at_once(hybrid: Hybrid) -> None:
    """Both workers frozen (SIGSTOP) while 24 calls go to them — more than their kept-alive
    connections, so some wait in the ports' backlogs — then killed: no call waits for the
    restarted workers. Each is answered by the fallback; or, when its one retry went to the
    other worker in the instant before that one's exit was seen, a 502."""
    workers = hybrid.supervisor.replicas()
    wait_until(lambda: hybrid.supervisor.num_ready == 2, 60, "both workers ready")
    pids = [w.pid or 0 for w in workers]
    local = {"x-aicc-variant": "local"}
    remote_before = hybrid.served()["remote"]

    def local_call(index: int) -> int:
        with hybrid.client() as client:
            return client.post(ROUTE, json=chat(), headers=local).status_code

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(local_call, i) for i in range(24)]
            wait_until(
                lambda: sum(hybrid.router.outstanding.num_outstanding(w.id) for w in workers)
                >= 24, 30, "every call is on a frozen worker",
            )  # fmt: skip
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            results = [future.result(timeout=60) for future in futures]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    statuses = Counter(results)
    assert set(statuses) <= {200, 502}, results
    assert statuses[200] >= 12, results
    wait_until(lambda: hybrid.supervisor.num_ready == 2, 60, "both workers ready again")
    served = hybrid.served()  # the restarted workers count from 0
    assert served["worker-0"] == served["worker-1"] == 0
    assert served["remote"] - remote_before == statuses[200]
