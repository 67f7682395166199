"""The text table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from aicc.loadgen.report import (
    BenchConfig,
    format_table,
    level_label,
    to_json,
    write_json,
    write_plot,
)
from aicc.loadgen.runner import Load, RequestResult, RunResult
from aicc.loadgen.stats import Slo, Summary, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(concurrency: int | None, rate: float = math.inf, failed: int = 0) -> RunResult:
    ok = [RequestResult(0.0, 1.0 + i / 10, 0.1, (0.1, 0.2), 10, 20) for i in range(4)]
    bad = [RequestResult(0.0, 0.01, None, (), 0, None, "HTTP 503: busy")] * failed
    return RunResult(Load(concurrency, rate), tuple(ok + bad), 2.0)


CONFIG = BenchConfig(
    base_url="http://127.0.0.1:8080",
    model="m",
    endpoint="chat",
    dataset="random",
    num_prompts=4,
    input_len=16,
    output_len=10,
    request_rate=math.inf,
    warmup=1,
    seed=0,
    ignore_eos=False,
    percentiles=(90.0, 99.0),
    slo=Slo(ttft_ms=500),
)


def summaries(runs: list[RunResult]) -> list[Summary]:
    return [summarize(run, (90.0, 99.0), Slo(ttft_ms=500)) for run in runs]


def test_level_labels() -> None:
    assert [level_label(s) for s in summaries([make_run(4), make_run(None), make_run(2, 1.5)])] == [
        "c=4",
        "c=inf",
        "c=2 rate=1.5/s",
    ]


def test_table_has_a_column_per_level_and_lists_errors() -> None:
    runs = [make_run(1), make_run(4, failed=2)]
    text = format_table(summaries(runs), (90.0, 99.0))
    lines = text.splitlines()
    assert lines[1].split() == ["c=1", "c=4"]
    rows = {line[:32].strip(): line[32:].split() for line in lines if line[:1].isalpha()}
    assert rows["Successful requests"] == ["4", "4"]
    assert rows["Failed requests"] == ["0", "2"]
    assert rows["Request goodput (req/s)"] == ["2.00", "2.00"]
    assert rows["Median TTFT (ms)"] == ["100.00", "100.00"]
    assert "P90 TPOT (ms)" in rows
    assert "P99 E2E (ms)" in rows
    assert lines[-1] == "c=4: 2 x HTTP 503: busy"


def test_json_is_strict_and_complete(tmp_path: Path) -> None:
    runs = [make_run(1), make_run(None, failed=1)]
    path = tmp_path / "out.json"
    write_json(path, to_json(CONFIG, summaries(runs), runs))
    data = json.loads(path.read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    assert data["config"]["request_rate"] is None
    assert data["config"]["slo"] == {"ttft_ms": 500, "tpot_ms": None, "e2e_ms": None}
    first, second = data["results"]
    assert first["concurrency"] == 1
    assert second["concurrency"] is None
    assert second["failed_requests"] == 1
    assert first["ttft_ms"] == {
        "count": 4,
        "mean": 100.0,
        "median": 100.0,
        "p90": 100.0,
        "p99": 100.0,
    }
    assert first["request_goodput"] == 2.0
    assert len(second["requests"]) == 5
    assert second["requests"][-1]["error"] == "HTTP 503: busy"
    assert first["requests"][0]["itl_ms"] == pytest.approx([100.0, 200.0])
    assert first["requests"][0]["tpot_ms"] == pytest.approx(100.0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    assert write_plot(path, summaries([make_run(1), make_run(4), make_run(16)]), (99.0,)) is None
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_plot_of_only_failures_still_draws(tmp_path: Path) -> None:
    failed_only = RunResult(Load(1), (RequestResult(0.0, 0.1, None, (), 0, None, "x"),), 1.0)
    path = tmp_path / "chart.png"
    assert write_plot(path, [summarize(failed_only)], (99.0,)) is None
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib_is_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    note = write_plot(tmp_path / "chart.png", summaries([make_run(1)]), (99.0,))
    assert note is not None
    assert "matplotlib is not installed" in note
    assert not (tmp_path / "chart.png").exists()
