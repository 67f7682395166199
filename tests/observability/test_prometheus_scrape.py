"""A real Prometheus scrapes a live aicc (with the admin key) after a few OpenAI SDK calls; its
PromQL answers must match what was sent."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from tests.conftest import ADMIN_KEY, LiveServer, start_server
from tests.fixtures.prometheus import Prometheus, find_prometheus, prometheus_server

NUM_CHATS = 3
NUM_STREAMS = 2
NUM_COMPLETIONS = 2
NUM_GENERATIONS = NUM_CHATS + NUM_STREAMS + NUM_COMPLETIONS
IGNORE_EOS = {"ignore_eos": True}
"""At least two tokens per generation, for the time per output token."""


@dataclass(frozen=True, slots=True)
class Traffic:
    """What the test sent, as the API reported it."""

    labels: str
    """PromQL label matchers of the served model."""
    num_prompt_tokens: int
    num_generated_tokens: int


@pytest.fixture(scope="module")
def metrics_server(model_dir: Path) -> Iterator[LiveServer]:
    live = start_server(model_dir, max_batch_size=4, ctx_size=2048, prefix_cache=False)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def prometheus(metrics_server: LiveServer) -> Iterator[Prometheus]:
    if find_prometheus() is None:
        pytest.skip("Prometheus is not installed (Debian package `prometheus`)")
    target = urlsplit(metrics_server.base_url).netloc
    with prometheus_server(target, bearer_token=ADMIN_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def traffic(metrics_server: LiveServer, prometheus: Prometheus) -> Traffic:
    """Chats, streamed chats, completions and one bad key; returns once Prometheus saw them."""
    client = openai.OpenAI(base_url=f"{metrics_server.base_url}/v1", api_key=ADMIN_KEY)
    model = metrics_server.engine.model_info.name
    messages: Any = [{"role": "user", "content": "Count from one to twenty."}]
    usages = []
    for _ in range(NUM_CHATS):
        chat = client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, extra_body=IGNORE_EOS
        )
        usages.append(chat.usage)
    for _ in range(NUM_STREAMS):
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        usages.append([chunk.usage for chunk in stream if chunk.usage is not None][-1])
    for _ in range(NUM_COMPLETIONS):
        completion = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=5, extra_body=IGNORE_EOS
        )
        usages.append(completion.usage)
    bad_key = "aicc-sk-" + "x" * 40
    intruder = openai.OpenAI(base_url=f"{metrics_server.base_url}/v1", api_key=bad_key)
    with pytest.raises(openai.AuthenticationError):
        intruder.models.list()

    labels = f'model="{model}",variant=""'
    ok = f'aicc_requests_total{{{labels},method="POST",status="200"'
    prometheus.wait_for(f'{ok},route="/v1/chat/completions"}}', equals(NUM_CHATS + NUM_STREAMS))
    prometheus.wait_for(f'{ok},route="/v1/completions"}}', equals(NUM_COMPLETIONS))
    prometheus.wait_for('sum(aicc_auth_denied_total{status="401"})', equals(1))
    assert all(usage is not None for usage in usages)
    return Traffic(
        labels,
        sum(usage.prompt_tokens for usage in usages if usage is not None),
        sum(usage.completion_tokens for usage in usages if usage is not None),
    )


def scalar(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def equals(expected: float) -> Any:
    return lambda result: len(result) == 1 and float(result[0]["value"][1]) == expected


def test_prometheus_scrapes_with_the_admin_key(traffic: Traffic, prometheus: Prometheus) -> None:
    assert scalar(prometheus.query('up{job="aicc"}')) == 1
    (target,) = prometheus.targets()
    assert target["health"] == "up"


def test_token_counters_match_the_usage_reported(traffic: Traffic, prometheus: Prometheus) -> None:
    prompt = scalar(prometheus.query(f"aicc_prompt_tokens_total{{{traffic.labels}}}"))
    generated = scalar(prometheus.query(f"aicc_generation_tokens_total{{{traffic.labels}}}"))
    assert prompt == traffic.num_prompt_tokens
    assert generated == traffic.num_generated_tokens


@pytest.mark.parametrize(
    ("histogram", "num_expected"),
    [
        ("aicc_time_to_first_token_seconds", NUM_GENERATIONS),
        ("aicc_time_per_output_token_seconds", NUM_GENERATIONS),
        ("aicc_queue_time_seconds", NUM_GENERATIONS),
        ("aicc_batch_size", None),  # one per engine step: at least one per generation
        ("aicc_engine_step_seconds", None),
    ],
)
def test_model_histograms_have_observations(
    traffic: Traffic, prometheus: Prometheus, histogram: str, num_expected: int | None
) -> None:
    count = scalar(prometheus.query(f"{histogram}_count{{{traffic.labels}}}"))
    if num_expected is None:
        assert count >= NUM_GENERATIONS
    else:
        assert count == num_expected
    infinite = f'{histogram}_bucket{{{traffic.labels},le="+Inf"}}'
    assert scalar(prometheus.query(infinite)) == count
    median = f"histogram_quantile(0.5, sum by (le) ({histogram}_bucket{{{traffic.labels}}}))"
    assert math.isfinite(scalar(prometheus.query(median)))


def test_request_duration_by_route(traffic: Traffic, prometheus: Prometheus) -> None:
    selector = f'{traffic.labels},method="POST",route="/v1/completions"'
    count = scalar(prometheus.query(f"aicc_request_duration_seconds_count{{{selector}}}"))
    assert count == NUM_COMPLETIONS
    buckets = f"aicc_request_duration_seconds_bucket{{{selector}}}"
    p99 = f"histogram_quantile(0.99, sum by (le) ({buckets}))"
    assert 0 < scalar(prometheus.query(p99)) < 300


def test_gauges_process_and_gpu(
    traffic: Traffic, prometheus: Prometheus, metrics_server: LiveServer
) -> None:
    usage = scalar(prometheus.query(f"aicc_kv_cache_usage_ratio{{{traffic.labels}}}"))
    assert 0 <= usage <= 1
    assert scalar(prometheus.query(f"aicc_requests_running{{{traffic.labels}}}")) >= 0
    assert scalar(prometheus.query(f"aicc_requests_waiting{{{traffic.labels}}}")) >= 0
    assert scalar(prometheus.query("aicc_process_resident_memory_bytes")) > 0
    assert scalar(prometheus.query("aicc_process_cpu_seconds_total")) > 0
    if metrics_server.app.state.metrics.gpu is None:  # a CPU machine: no GPU series at all
        assert prometheus.query('{__name__=~"aicc_gpu_.*"}') == []
    else:
        assert scalar(prometheus.query('aicc_gpu_memory_total_bytes{gpu="0"}')) > 0
