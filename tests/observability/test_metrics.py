"""`Metrics`: what one call, one engine step, one audit commit and a GPU turn into; the engine's
queue time and step samples; `GET /metrics` (permission, public) and the separate port."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aicc.api.record import CallOutcome, CallRecord
from aicc.engine.llamacpp.loop import Submit
from aicc.engine.types import EngineStats, GenerationRequest, SamplingParams, StepSample
from aicc.errors import ConfigError, EngineUnavailableError
from aicc.observability.gpu import GpuReader
from aicc.observability.metrics import Metrics
from aicc.observability.metrics_server import start_metrics_server
from tests.conftest import LiveServer, start_server

MODEL = "gemma-test"


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the rendered text, keyed by name and labels."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def call(
    status: int = 200,
    *,
    model: str | None = MODEL,
    route: str = "/v1/chat/completions",
    latency_s: float = 0.5,
    **fields: Any,
) -> tuple[CallRecord, CallOutcome]:
    record = CallRecord("req-1", model=model, **fields)
    outcome = CallOutcome("POST", route, route, status, latency_s, "127.0.0.1", None)
    return record, outcome


class FakeEngine:
    """Stats and step samples as the engine would report them."""

    def __init__(self, steps: list[StepSample], *, is_running: bool = True) -> None:
        self.steps = steps
        self.is_running = is_running

    def stats(self) -> EngineStats:
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")
        return EngineStats(2, 3, 5, 256, 1024, 10, 1, 0, 7, 4, 0, 2)

    def drain_step_samples(self) -> list[StepSample]:
        drained, self.steps = self.steps, []
        return drained


def bound(engine: object | None = None) -> Metrics:
    metrics = Metrics()
    metrics.bind(engine, None, MODEL)  # type: ignore[arg-type]
    return metrics


def test_a_generation_counts_request_latencies_and_tokens() -> None:
    metrics = bound()
    started = time.perf_counter()
    record, outcome = call(
        num_prompt_tokens=12,
        num_completion_tokens=5,
        queue_time_s=0.02,
        started=started,
        first_token_at=started + 0.3,
        last_token_at=started + 0.7,
    )
    metrics.observe_call(record, outcome)
    metrics.observe_call(*call(latency_s=0.1, num_prompt_tokens=3, num_completion_tokens=1))
    model = {"model": MODEL, "variant": ""}
    route = {**model, "route": "/v1/chat/completions", "method": "POST"}
    assert value(metrics, "aicc_requests_total", **route, status="200") == 2
    assert value(metrics, "aicc_request_duration_seconds_count", **route) == 2
    assert value(metrics, "aicc_request_duration_seconds_sum", **route) == pytest.approx(0.6)
    assert value(metrics, "aicc_request_duration_seconds_bucket", **route, le="0.25") == 1
    assert value(metrics, "aicc_prompt_tokens_total", **model) == 15
    assert value(metrics, "aicc_generation_tokens_total", **model) == 6
    assert value(metrics, "aicc_time_to_first_token_seconds_count", **model) == 1
    assert value(metrics, "aicc_time_to_first_token_seconds_sum", **model) == pytest.approx(0.3)
    assert value(metrics, "aicc_time_per_output_token_seconds_sum", **model) == pytest.approx(0.1)
    assert value(metrics, "aicc_queue_time_seconds_sum", **model) == pytest.approx(0.02)
    assert value(metrics, "aicc_queue_time_seconds_count", **model) == 1


def test_refusals_are_counted_by_kind() -> None:
    metrics = bound()
    metrics.observe_call(*call(401, model=None, error_code="invalid_api_key"))
    metrics.observe_call(*call(403, route="/admin/users", error_code="permission_denied"))
    metrics.observe_call(*call(429, error_code="rate_limit_exceeded"))
    metrics.observe_call(*call(429, error_code="queue_full"))  # busy, not a rate limit
    route = "/v1/chat/completions"
    assert value(metrics, "aicc_auth_denied_total", route=route, status="401") == 1
    assert value(metrics, "aicc_auth_denied_total", route="/admin/users", status="403") == 1
    assert value(metrics, "aicc_rate_limited_total", model=MODEL, variant="") == 1
    labels = {"model": MODEL, "variant": "", "route": route, "method": "POST"}
    assert value(metrics, "aicc_requests_total", **labels, status="429") == 2


def test_an_unserved_model_name_does_not_become_a_label() -> None:
    metrics = bound()
    metrics.observe_call(*call(404, model="anything-a-client-typed"))
    labels = {"variant": "", "route": "/v1/chat/completions", "method": "POST", "status": "404"}
    assert value(metrics, "aicc_requests_total", model="", **labels) == 1
    assert not any("anything-a-client-typed" in str(key) for key in samples(metrics))


def test_engine_state_is_read_and_step_samples_drained_at_scrape() -> None:
    engine = FakeEngine([StepSample(1, 40, 0.03), StepSample(4, 4, 0.004)])
    metrics = bound(engine)
    model = {"model": MODEL, "variant": ""}
    first = samples(metrics)
    assert first[("aicc_requests_running", frozenset(model.items()))] == 2
    assert first[("aicc_requests_waiting", frozenset(model.items()))] == 3
    assert first[("aicc_kv_cache_usage_ratio", frozenset(model.items()))] == 0.25
    assert first[("aicc_batch_size_count", frozenset(model.items()))] == 2
    assert first[("aicc_batch_size_sum", frozenset(model.items()))] == 5
    assert first[("aicc_engine_step_seconds_sum", frozenset(model.items()))] == pytest.approx(0.034)
    engine.steps = [StepSample(2, 2, 0.01)]
    assert value(metrics, "aicc_batch_size_count", **model) == 3  # drained, not re-counted
    engine.is_running = False
    assert value(metrics, "aicc_requests_running", **model) is None  # absent, not an error


def test_audit_commits_and_process_metrics() -> None:
    metrics = Metrics()
    metrics.observe_audit_commit(0.004, 3)
    metrics.observe_audit_commit(0.002, 1)
    assert value(metrics, "aicc_audit_write_seconds_count") == 2
    assert value(metrics, "aicc_audit_records_total") == 4
    assert (value(metrics, "aicc_process_resident_memory_bytes") or 0) > 0
    assert value(metrics, "aicc_process_cpu_seconds_total") is not None


def test_no_gpu_metrics_without_nvml() -> None:
    if GpuReader.open() is not None:
        pytest.skip("this machine has an NVIDIA GPU")
    metrics = bound()
    assert metrics.gpu is None
    assert not any(name.startswith("aicc_gpu_") for name, _ in samples(metrics))


class FakeNvml:
    """The few NVML calls the reader makes, for one device without a temperature sensor."""

    NVML_TEMPERATURE_GPU = 0
    NVMLError = RuntimeError

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=2 << 30, total=80 << 30, free=78 << 30)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        raise self.NVMLError("not supported")

    def nvmlShutdown(self) -> None:
        pass


def test_gpu_readings_per_device() -> None:
    metrics = Metrics(gpu=GpuReader(FakeNvml(), 1))
    metrics.bind(None, None, MODEL)
    assert value(metrics, "aicc_gpu_utilization_ratio", gpu="0") == pytest.approx(0.37)
    assert value(metrics, "aicc_gpu_memory_used_bytes", gpu="0") == 2 << 30
    assert value(metrics, "aicc_gpu_memory_total_bytes", gpu="0") == 80 << 30
    assert not any(name == "aicc_gpu_temperature_celsius" for name, _ in samples(metrics))
    metrics.close()
    assert metrics.gpu is None


def test_the_metrics_port_serves_only_metrics() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        metrics.observe_audit_commit(0.001, 1)
        server = await start_metrics_server(metrics, "127.0.0.1", 0)
        port = server.port
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                response = await client.get("/metrics")
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
                assert "aicc_audit_records_total 1.0" in response.text
                assert (await client.get("/v1/models")).status_code == 404
                assert (await client.post("/metrics")).status_code == 405
            with pytest.raises(ConfigError, match="cannot serve metrics"):
                await start_metrics_server(metrics, "127.0.0.1", server.port)
        finally:
            await server.stop()
        with socket.socket() as probe:  # the port is free again
            probe.bind(("127.0.0.1", port))

    asyncio.run(scenario())


def test_the_engine_reports_queue_time_and_step_samples(server: LiveServer) -> None:
    engine = server.engine
    engine.drain_step_samples()
    engine_loop = engine._loop_runner  # type: ignore[attr-defined]
    out: asyncio.Queue[object] = asyncio.Queue()
    params = SamplingParams(temperature=0.0, max_tokens=4, n=2, ignore_eos=True)
    request = GenerationRequest(
        "queue-time", tuple(engine.tokenize("Hello there", add_special=True)), params
    )
    submitted = time.perf_counter()
    engine_loop.inbox.put(Submit(request, 4, out))
    events: list[Any] = []
    deadline = time.monotonic() + 30
    while sum(event.finish_reason is not None for event in events) < 2:
        assert time.monotonic() < deadline, events
        if out.empty():
            time.sleep(0.01)
            continue
        events.append(out.get_nowait())
    elapsed = time.perf_counter() - submitted
    for index in (0, 1):
        choice = [event for event in events if event.index == index]
        assert len(choice) == 4
        first, *rest = choice
        assert first.queue_time_s is not None
        assert 0 <= first.queue_time_s < elapsed
        assert all(event.queue_time_s is None for event in rest)
    steps = engine.drain_step_samples()
    assert len(steps) >= 4  # a prefill, then a decode step per further token
    assert all(step.batch_size >= 1 and step.num_tokens >= step.batch_size for step in steps)
    assert all(0 < step.duration_s < elapsed for step in steps)
    assert engine.drain_step_samples() == []
    server.wait_until_idle()


def test_metrics_on_the_main_port_need_metrics_read(server: LiveServer) -> None:
    user_key = server.create_user_key("metrics-reader-not", ("user",))
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/metrics").status_code == 401
        denied = client.get("/metrics", headers={"Authorization": f"Bearer {user_key}"})
        assert denied.status_code == 403
        response = client.get("/metrics", headers=server.headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "aicc_requests_total{" in response.text


def test_public_metrics_and_the_metrics_port(model_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    live = start_server(model_dir, max_batch_size=1, metrics_public=True, metrics_port=port)
    try:
        public = httpx.get(f"{live.base_url}/metrics", timeout=30)
        assert public.status_code == 200
        assert "aicc_kv_cache_usage_ratio{" in public.text
        separate = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert separate.status_code == 200
        assert "aicc_kv_cache_usage_ratio{" in separate.text
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 404
    finally:
        live.stop()
    with pytest.raises(httpx.TransportError):  # the metrics port closed with the server
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
