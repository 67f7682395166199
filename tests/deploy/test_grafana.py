"""The provisioned Grafana dashboard: well-formed panels, PromQL that Prometheus's own parser
(`promtool`) accepts, and only metrics — and labels — that aicc really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from aicc.api.record import CallOutcome, CallRecord
from aicc.engine.types import EngineStats, StepSample
from aicc.observability.gpu import GpuSample
from aicc.observability.metrics import Metrics

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "aicc.json"

# Concrete values for Grafana's variables, so the expressions are plain PromQL.
_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "model": "gemma-3-270m",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC = re.compile(r"\b(aicc_\w+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_TARGET_LABELS = frozenset({"instance", "job"})
"""Labels Prometheus attaches to every scraped series."""
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _expressions() -> Iterator[tuple[str, str]]:
    """(panel title + refId, expression with Grafana's variables replaced)."""
    for panel in _panels():
        for target in panel["targets"]:
            yield f"{panel['title']} {target['refId']}", _substitute(target["expr"])


def _substitute(expression: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in _VARIABLES, f"unknown dashboard variable ${name} in {expression}"
        return _VARIABLES[name]

    return _VARIABLE.sub(value, expression)


class _EngineStub:
    """Just the two read-only calls `Metrics` makes at a scrape."""

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=1,
            num_waiting=2,
            num_outstanding=3,
            kv_cells_used=10,
            kv_cells_total=100,
            num_steps=5,
            num_preemptions=0,
            num_cached_prefixes=0,
            num_prefix_hit_tokens=0,
            num_finished=1,
            num_aborted=0,
            last_step_batch_size=1,
        )

    def drain_step_samples(self) -> list[StepSample]:
        return [StepSample(batch_size=1, num_tokens=8, duration_s=0.01)]


class _GpuStub:
    """One device, as NVML would report it (the real reader needs a driver)."""

    def read(self) -> list[GpuSample]:
        return [GpuSample(0, 0.5, 1 << 30, 8 << 30, 55.0)]

    def close(self) -> None:
        pass


@cache
def _exported() -> dict[str, frozenset[str]]:
    """Every series name a fully bound `Metrics` exports, with its label names; histograms and
    counters with all their suffixes."""
    metrics = Metrics(gpu=_GpuStub())  # type: ignore[arg-type]
    metrics.bind(_EngineStub(), None, "gemma-3-270m")  # type: ignore[arg-type]
    record = CallRecord("r1", model="gemma-3-270m", num_prompt_tokens=5)
    record.num_completion_tokens = 3
    record.first_token_at, record.last_token_at = record.started + 0.1, record.started + 0.3
    record.queue_time_s = 0.01
    for status in (200, 401, 429):
        outcome = CallOutcome(
            "POST", "/v1/chat/completions", "/v1/chat/completions", status, 0.5, None, None
        )
        metrics.observe_call(record, outcome)
    metrics.observe_audit_commit(0.002, 3)
    body, _ = metrics.render()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        suffixes = {"histogram": _HISTOGRAM_SUFFIXES, "counter": ("_total",)}.get(
            family.type, ("",)
        )
        for name in [family.name + suffix for suffix in suffixes] + [
            s.name for s in family.samples
        ]:
            names.setdefault(name, set()).update(labels)
    return {name: frozenset(labels) for name, labels in names.items()}


def test_every_panel_has_a_datasource_and_a_query() -> None:
    panels = _panels()
    assert len(panels) >= 17
    for panel in panels:
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_has_the_core_panels_and_a_model_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41  # Grafana 10 and 11
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == "prometheus"
    assert variables["model"]["includeAll"]
    expressions = " ".join(expression for _, expression in _expressions())
    for metric in (
        "aicc_requests_total",
        "aicc_request_duration_seconds_bucket",
        "aicc_time_to_first_token_seconds_bucket",
        "aicc_time_per_output_token_seconds_bucket",
        "aicc_prompt_tokens_total",
        "aicc_generation_tokens_total",
        "aicc_requests_waiting",
        "aicc_requests_running",
        "aicc_batch_size_bucket",
        "aicc_kv_cache_usage_ratio",
        "aicc_gpu_utilization_ratio",
        "aicc_gpu_memory_used_bytes",
        "aicc_process_cpu_seconds_total",
        "aicc_process_resident_memory_bytes",
        "aicc_rate_limited_total",
        "aicc_auth_denied_total",
        "aicc_audit_write_seconds_bucket",
    ):
        assert metric in expressions, f"no panel shows {metric}"


def test_provisioning_points_at_the_dashboard_and_datasource() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "prometheus")
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/aicc.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


@cache
def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/install-test-deps.sh installs it)")
    return promtool


def _check_rules(expressions: list[str], directory: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on one recording rule per expression: Prometheus's parser."""
    rules = [{"record": f"aicc_dashboard:expr_{i}", "expr": e} for i, e in enumerate(expressions)]
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    labelled = list(_expressions())
    result = _check_rules([expression for _, expression in labelled], tmp_path)
    listing = "\n".join(f"{i}: {name}: {e}" for i, (name, e) in enumerate(labelled))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{listing}"


def test_promtool_check_rejects_bad_promql(tmp_path: Path) -> None:
    result = _check_rules(["sum(rate(aicc_requests_total[1m])"], tmp_path)
    assert result.returncode != 0


def test_expressions_use_only_exported_metrics_and_labels() -> None:
    exported = _exported()
    for name, expression in _expressions():
        used = _METRIC.findall(expression)
        assert used, f"{name}: no aicc metric in {expression}"
        labels: set[str] = set(_TARGET_LABELS)
        for metric, selector in used:
            assert metric in exported, f"{name}: aicc does not export {metric}"
            for label in _MATCHER.findall(selector):
                assert label in exported[metric], f"{name}: {metric} has no label {label!r}"
            labels |= exported[metric]
        for grouping in _GROUPING.findall(expression):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in labels | {"le"}, f"{name}: no series has label {label!r}"


def test_the_exported_names_come_from_metrics() -> None:
    exported = _exported()
    assert "aicc_request_duration_seconds_bucket" in exported
    assert "aicc_gpu_memory_total_bytes" in exported
    assert "aicc_no_such_metric" not in exported
    assert "model" in exported["aicc_requests_total"]
