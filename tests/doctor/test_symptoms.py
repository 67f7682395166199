"""The troubleshooting symptoms, read from Prometheus text as aicc exposes it; the report."""

from __future__ import annotations

import json

import pytest

from aicc.config import Settings, load_settings
from aicc.doctor.checks import CheckResult, Status, failed, passed, skipped, warned
from aicc.doctor.report import exit_code, render_text, to_json
from aicc.doctor.symptoms import MetricSnapshot, Scrapes, symptom_checks

LABELS = 'model="m",variant=""'


def exposition(
    *,
    waiting: int = 0,
    running: int = 1,
    kv: float = 0.2,
    preemptions: int = 0,
    cpu_s: float = 10.0,
    calls: dict[str, int] | None = None,
    ttft: tuple[float, int] = (0.3, 3),
    prompt_tokens: int = 100,
    hit_tokens: int = 50,
    gpu: float | None = None,
) -> str:
    calls = calls if calls is not None else {"200": 30}
    lines = [
        "# TYPE aicc_requests counter",
        *(
            f'aicc_requests_total{{{LABELS},route="/v1/completions",method="POST",'
            f'status="{status}"}} {count}'
            for status, count in calls.items()
        ),
        "# TYPE aicc_requests_waiting gauge",
        f"aicc_requests_waiting{{{LABELS}}} {waiting}",
        "# TYPE aicc_requests_running gauge",
        f"aicc_requests_running{{{LABELS}}} {running}",
        "# TYPE aicc_kv_cache_usage_ratio gauge",
        f"aicc_kv_cache_usage_ratio{{{LABELS}}} {kv}",
        "# TYPE aicc_engine_preemptions counter",
        f"aicc_engine_preemptions_total{{{LABELS}}} {preemptions}",
        "# TYPE aicc_prefix_cache_hit_tokens counter",
        f"aicc_prefix_cache_hit_tokens_total{{{LABELS}}} {hit_tokens}",
        "# TYPE aicc_prompt_tokens counter",
        f"aicc_prompt_tokens_total{{{LABELS}}} {prompt_tokens}",
        "# TYPE aicc_time_to_first_token_seconds histogram",
        f'aicc_time_to_first_token_seconds_bucket{{{LABELS},le="+Inf"}} {ttft[1]}',
        f"aicc_time_to_first_token_seconds_count{{{LABELS}}} {ttft[1]}",
        f"aicc_time_to_first_token_seconds_sum{{{LABELS}}} {ttft[0] * ttft[1]}",
        "# TYPE aicc_process_cpu_seconds counter",
        f"aicc_process_cpu_seconds_total {cpu_s}",
    ]
    if gpu is not None:
        lines += [
            "# TYPE aicc_gpu_utilization_ratio gauge",
            f'aicc_gpu_utilization_ratio{{gpu="0"}} {gpu}',
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    state = tmp_path_factory.mktemp("symptoms")
    return load_settings(state_dir=state, max_queue=100, max_batch_size=8, threads=4)


def run(settings: Settings, first: str, second: str) -> dict[str, CheckResult]:
    scrapes = Scrapes(MetricSnapshot(first), MetricSnapshot(second), 1.0, settings)
    return {result.name: result for result in symptom_checks(scrapes)}


def test_a_calm_server_has_no_symptoms(settings: Settings) -> None:
    results = run(settings, exposition(), exposition(cpu_s=10.5))
    assert all(r.status in (Status.PASS, Status.SKIP) for r in results.values()), results
    assert results["server: cpu"].value == "0.50 cores busy over 1.0 s (threads 4)"
    assert results["server: prefix cache"].value.endswith("(50%) came from the prefix cache")
    assert results["server: gpu"].status is Status.SKIP


def test_saturation_shows_in_queue_batch_cpu_and_gpu(settings: Settings) -> None:
    busy = exposition(waiting=60, running=8, cpu_s=13.8, gpu=0.99)
    results = run(settings, exposition(), busy)
    for name in ("server: queue", "server: batch", "server: cpu", "server: gpu"):
        assert results[name].status is Status.WARN, results[name]
    assert "60 waiting (max_queue 100)" in results["server: queue"].value
    assert "429" in results["server: queue"].fix
    assert results["server: cpu"].value.startswith("3.80 cores busy")


def test_a_full_kv_cache_and_preemptions_warn(settings: Settings) -> None:
    results = run(settings, exposition(), exposition(kv=0.95))
    assert results["server: kv cache"].status is Status.WARN
    results = run(settings, exposition(), exposition(preemptions=3))
    assert results["server: kv cache"].value == "20% in use; 3 preemptions since start"
    assert "ctx_size" in results["server: kv cache"].fix


def test_errors_and_overload_warn_once_there_are_enough_calls(settings: Settings) -> None:
    calls = {"200": 80, "500": 5, "429": 15}
    results = run(settings, exposition(calls=calls), exposition(calls=calls))
    assert results["server: errors"].value == "5 of 100 calls since start answered 5xx"
    assert results["server: errors"].status is Status.WARN
    assert results["server: overload"].status is Status.WARN
    assert "queue was full" in results["server: overload"].fix
    few = {"200": 2, "500": 1}
    assert run(settings, exposition(), exposition(calls=few))["server: errors"].status is (
        Status.PASS
    )


def test_slow_first_token_and_cold_prefix_cache_warn(settings: Settings) -> None:
    cold = exposition(ttft=(3.5, 40), prompt_tokens=50_000, hit_tokens=100)
    results = run(settings, exposition(), cold)
    assert results["server: first token"].status is Status.WARN
    assert results["server: first token"].value == (
        "mean time to first token 3.50 s over 40 requests"
    )
    assert results["server: prefix cache"].status is Status.WARN


def test_text_that_is_not_prometheus_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        MetricSnapshot("<html>not metrics</html>\n")


RESULTS = [
    passed("python", "3.11.7"),
    warned("disk", "900 MiB free", "free space"),
    skipped("ldap", "not configured"),
]


def test_exit_code_is_1_only_with_a_failure() -> None:
    assert exit_code(RESULTS) == 0
    assert exit_code([*RESULTS, failed("tls", "expired", "renew")]) == 1


def test_text_report_has_a_row_per_check_and_a_summary() -> None:
    text = render_text(RESULTS, aligned=False)
    assert text.splitlines()[0] == "CHECK\tSTATUS\tVALUE\tFIX"
    assert "disk\tWARN\t900 MiB free\tfree space" in text
    assert text.endswith("no failures: 1 pass, 1 warn, 1 skip")


def test_json_report_round_trips() -> None:
    data = json.loads(json.dumps(to_json([*RESULTS, failed("tls", "expired", "renew")])))
    assert data["ok"] is False
    assert data["summary"] == {"pass": 1, "warn": 1, "fail": 1, "skip": 1}
    assert data["checks"][3] == {
        "name": "tls",
        "status": "FAIL",
        "value": "expired",
        "fix": "renew",
    }
